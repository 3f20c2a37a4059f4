"""``rankshard-evaluate pgd``: targeted/untargeted PGD robustness (the paper's Table 2)."""
from __future__ import annotations

import click

from rankshard.train.attacks import PGDConfig, parse_eps

from rankshard.evaluate.errors import EvaluationError, friendly_errors
from rankshard.evaluate.options import (checkpoint_options, data_options, finish, open_data, rank_engine, setup,
                                        svd_backend_option)
from rankshard.evaluate.robustness import Extras, PGDEvalConfig
from rankshard.evaluate.runs import describe_attack, run_pgd
from rankshard.evaluate.spectrum import SpectrumConfig, parse_ranks
from rankshard.evaluate.tables import markdown_table, pgd_table_rows


def _eps(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_eps(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def attack_config(norm, eps, steps, step_size, targeted, restarts, seed) -> PGDEvalConfig:
    """The attack from CLI values; PGDConfig's checks (e.g. linf eps=4 -> 'did you mean 4/255') as user errors."""
    try:
        return PGDEvalConfig(PGDConfig(norm, eps, steps, step_size, targeted, restarts=restarts), seed)
    except ValueError as exc:
        raise EvaluationError(f"--eps/--steps/--step-size/--restarts: {exc}") from None


@click.command("pgd")
@checkpoint_options
@data_options()
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", callback=_eps, default="4/255", show_default=True,
              help="Radius in [0, 1] pixel units; fractions allowed (4/255). L2: norm of the whole perturbation.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--step-size", callback=_eps, default=None, help="Default 2.5 * eps / steps (Madry et al.).")
@click.option("--targeted/--untargeted", default=True, show_default=True,
              help="Targeted: a random other class per sample (seeded by --seed and the sample key).")
@click.option("--restarts", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds targets and random starts.")
@click.option("--delta-rank/--no-delta-rank", default=False, show_default=True,
              help="Also measure each perturbation's rank structure: its own energy vs rank k and its share inside "
                   "the clean image's top-k singular subspaces (pgd-delta-rank.png/.csv, per-sample .npz).")
@click.option("--spectrum-ranks", default=None, metavar="RANKS",
              help="Also run Algorithm 1 on the clean and the adversarial inputs at these ranks ('0:32:4', '1,5,10', "
                   "'all'): top-1 on x_k, recovery and attack success on the truncated adversarial x'_k "
                   "(pgd-spectrum.png/.csv). The attack is made on the full-rank input, not through the truncation.")
@svd_backend_option
@friendly_errors
def command(checkpoints, out, device, trust_checkpoint, allow_size_mismatch, quiet, root, dataset, split, variant, limit,
            batch_size, workers, verify_shards, norm, eps, steps, step_size, targeted, restarts, seed, delta_rank,
            spectrum_ranks, svd_backend):
    """Attack success, recovery, clean top-1 and robust accuracy of each CKPT; per-sample CSVs and a
    Table-2-style pgd.md/pgd.csv across checkpoints."""
    cfg = attack_config(norm, eps, steps, step_size, targeted, restarts, seed)
    data = open_data(root, dataset, split, variant, batch_size, workers, limit, verify_shards)
    spectrum = None if spectrum_ranks is None else SpectrumConfig(parse_ranks(spectrum_ranks, min(data.image_size)))
    ctx, ckpts = setup(checkpoints, device, trust_checkpoint)
    extras = Extras(delta_rank, spectrum, rank_engine(svd_backend, ctx.device) if spectrum else None)
    rows = run_pgd(ckpts, data, cfg, ctx, out, allow_size_mismatch, quiet, extras)
    more = [name for name, wanted in (("pgd-delta-rank.png/.csv", delta_rank), ("pgd-spectrum.png/.csv", spectrum))
            if wanted]
    finish(ctx, f"{describe_attack(cfg)} on {data.name}\n\n{markdown_table(pgd_table_rows(rows or []))}"
                f"\n\nwritten to {out}/" + ", ".join(["pgd.md", "pgd.csv", "pgd.json", *more]))
