"""``rankshard-evaluate robustness``: robust accuracy / attack success / recovery as a function of eps."""
from __future__ import annotations

import click

from rankshard.train.autoattack import AttackBudget

from rankshard.evaluate.errors import EvaluationError, friendly_errors
from rankshard.evaluate.options import checkpoint_options, data_options, finish, open_data
from rankshard.evaluate.checkpoints import load_checkpoints
from rankshard.evaluate.distributed import init_from_env
from rankshard.evaluate.sweep import DEFAULT_EPS, SweepConfig, parse_eps_list, run_robustness
from rankshard.evaluate.tables import markdown_table, robustness_table


def _floats(option: str, text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise EvaluationError(f"{option}: expected three comma-separated numbers (R,G,B), got {text!r}") from None
    if len(values) != 3:
        raise EvaluationError(f"{option}: expected three values (R,G,B), got {len(values)}")
    return values


def normalization_override(preset: str | None, mean: str | None, std: str | None) -> dict:
    """``model_from_checkpoint`` overrides from --normalization / --mean / --std (both or neither of the last)."""
    if (mean is None) != (std is None):
        raise EvaluationError("--mean and --std go together: give both (e.g. --mean 0.4914,0.4822,0.4465 "
                              "--std 0.2470,0.2435,0.2616) or use --normalization cifar10|imagenet|none")
    if preset and mean:
        raise EvaluationError("give --normalization or --mean/--std, not both")
    if mean:
        return {"normalization": {"mean": _floats("--mean", mean), "std": _floats("--std", std)}}
    return {"normalization": preset} if preset else {}


@click.command("robustness")
@checkpoint_options
@data_options()
@click.option("--eps", "eps_list", default=DEFAULT_EPS, show_default=True,
              help="Ascending radii, comma-separated, [0, 1] pixel units; fractions allowed (8/255).")
@click.option("--attack", "attacks", default="aa", show_default=True,
              help="Comma-separated attacks run in order, each on the points still robust: pgd, apgd-ce, "
                   "apgd-dlr, apgd-t, fab-t, square, aa (AutoAttack standard). 'pgd,aa' reports AA <= PGD by construction.")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds random starts per sample key.")
@click.option("--pgd-steps", type=int, default=20, show_default=True)
@click.option("--apgd-steps", type=int, default=100, show_default=True, help="AutoAttack standard: 100.")
@click.option("--square-queries", type=int, default=5000, show_default=True, help="AutoAttack standard: 5000.")
@click.option("--fab-steps", type=int, default=100, show_default=True, help="AutoAttack standard: 100.")
@click.option("--target-classes", type=int, default=9, show_default=True,
              help="Target classes of APGD-T and FAB-T (standard: 9).")
@click.option("--normalization", type=click.Choice(["cifar10", "imagenet", "none"]), default=None,
              help="Input normalization of foreign checkpoints that record none (default: guessed, with a warning).")
@click.option("--mean", default=None, help="Per-channel mean R,G,B for foreign checkpoints (with --std).")
@click.option("--std", default=None, help="Per-channel std R,G,B for foreign checkpoints (with --mean).")
@friendly_errors
def command(checkpoints, out, device, trust_checkpoint, allow_size_mismatch, quiet, root, dataset, split, variant, limit,
            batch_size, workers, verify_shards, eps_list, attacks, norm, seed, pgd_steps, apgd_steps, square_queries,
            fab_steps, target_classes, normalization, mean, std):
    """Robust accuracy, attack success and recovery of each CKPT at every --eps; robustness.csv/json, per-sample
    CSVs and robustness.png (curves per checkpoint) in --out, shown by `rankshard-evaluate report`."""
    budget = AttackBudget(pgd_steps, apgd_steps, target_classes, square_queries, fab_steps)
    cfg = SweepConfig(parse_eps_list(eps_list), tuple(a.strip() for a in attacks.split(",") if a.strip()), norm, seed,
                      budget)
    overrides = normalization_override(normalization, mean, std)
    data = open_data(root, dataset, split, variant, batch_size, workers, limit, verify_shards)
    ctx = init_from_env(device)
    ckpts = load_checkpoints(checkpoints, ctx.device, trust=trust_checkpoint, **overrides)
    rows = run_robustness(ckpts, data, cfg, ctx, out, allow_size_mismatch, quiet)
    table = robustness_table(rows or [])
    finish(ctx, f"{table.caption}\n\n{markdown_table(table.rows)}\n\nwritten to {out}/robustness.csv, robustness.png, "
                "robustness.json")
