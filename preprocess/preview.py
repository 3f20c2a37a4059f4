"""``rankshard-preprocess preview``: the same images across every variant (the paper's Figure 3)
and the mean retained energy vs rank computed from the stored spectra.

ROOT is a folder, object storage or over HTTP a split or variant folder, found through ``format/tree.py``
(as ``ls`` and ``verify`` find theirs); remote shards are read by the one tar reader, each fetched whole and
checked against its manifest's sha256 and size. The images are written locally: for a URL ROOT, by default
``preview.png`` in the current folder (``_grid_path``), never a folder named after the URL.
"""
from __future__ import annotations

import functools
import posixpath
from pathlib import Path

import numpy as np

from rankshard.preprocess.format.codec import decode_image, decode_npy, decoded
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import manifest_problem, read_json
from rankshard.preprocess.format.transport import basename, is_url, join, parent
from rankshard.preprocess.format.tree import MANIFEST, can_list, folders_holding, is_ours, named_split, split_tree
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.format.tarindex import read_shard

DEFAULT_NAME = "preview.png"  # in each split's folder; for a URL ROOT, in the current folder


def _first_samples(folder: str, manifest: dict, count: int) -> list[tuple[str, dict]]:
    """The first ``count`` samples of a variant (``manifest``: its manifest), reading only as many shards as
    that takes."""
    problem = manifest_problem(join(folder, MANIFEST), manifest)
    if problem:
        raise RankshardError(problem)
    samples: list[tuple[str, dict]] = []
    for shard in manifest["shards"]:
        if len(samples) >= count:
            break
        samples += read_shard(join(folder, shard["name"]), shard["sha256"], shard.get("bytes"))
    return samples[:count]


def _splits(root: str) -> dict[str, tuple[tuple[str, ...], dict[str, dict]]]:
    """Split folder -> (its path below ROOT, {variant: its manifest} for the variants that have one); each
    manifest read once (remotely: one request)."""
    if not can_list(root):  # HTTP: ROOT names the split, its configuration names the variants
        split = named_split(root)
        return {split.url: ((), {n: m for n, m in split.manifests().items() if m})}
    root, files = split_tree(root)
    read = functools.lru_cache(maxsize=None)(read_json)  # each manifest read once (remotely: one request)
    found: dict[str, dict[str, dict]] = {}
    for variant in folders_holding(files, MANIFEST):
        url = join(root, variant, MANIFEST)
        if is_ours(read, url):  # not another tool's manifest.json beside ours
            found.setdefault(posixpath.dirname(variant), {})[posixpath.basename(variant)] = read(url)
    return {join(root, rel): (tuple(rel.split("/")) if rel else (), names) for rel, names in sorted(found.items())}


def _displayable(variant: str, members: dict) -> np.ndarray:
    img = decode_image(members)
    if variant.startswith(("high-", "highpass-")):
        # high-rank images are small and centred on zero: mid-grey plus contrast stretched to max |value|
        return 0.5 + 0.5 * img / max(float(np.abs(img).max()), 1e-6)
    return np.clip(img, 0, 1)


def _grid_variants(variants: list[str]) -> list[str]:
    """The image variants of a split in display order: full, low rank, high rank, factors, others."""
    order = {"full": 0, "rank": 1, "high": 2, "factors": 3, "lowpass": 4, "highpass": 5}
    return sorted((v for v in variants if v != "spectra"), key=lambda v: (order.get(v.split("-")[0], 4), v))


def _title(split: str) -> str:
    """``<dataset>/<split>``: the last two folders of the split's path or URL."""
    return f"{basename(parent(split))}/{basename(split)}"


def variant_grid(split: str, variants: dict[str, dict], count: int, out: Path,
                 progress: Progress | None = None) -> Path:
    """The first ``count`` images of each of ``variants`` (``{folder of split: its manifest}``, ``split`` a path
    or URL) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _grid_variants(variants)
    fig, axes = plt.subplots(count, len(names), figsize=(1.3 * len(names), 1.3 * count + 0.4), squeeze=False)
    for col, name in enumerate(names):
        for row, (key, members) in enumerate(_first_samples(join(split, name), variants[name], count)):
            ax = axes[row, col]
            ax.imshow(decoded(functools.partial(_displayable, name), members, join(split, name), key),
                      interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
            if col == 0:
                ax.set_ylabel(key, fontsize=6)
        if progress:
            progress.update(1)
    fig.suptitle(f"{_title(split)}: same images per variant (high rank: grey = 0, stretched to max |value|)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def energy_plot(split: str, spectra_manifest: dict, out: Path) -> Path:
    """Mean share of squared singular values kept by rank k, per channel, from the split's spectra variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = _first_samples(join(split, "spectra"), spectra_manifest, 4096)
    values = min(spectra_manifest["image_size"])  # singular values per channel

    def spectrum(members: dict) -> np.ndarray:
        s = decode_npy(members["s.npy"])
        if s.shape != (3, values):  # one damaged header would otherwise fail the stacking below
            raise ValueError(f"spectrum of shape {s.shape}, the manifest's images give (3, {values})")
        return s.astype(np.float64)

    spectra = np.stack([decoded(spectrum, m, join(split, "spectra"), key) for key, m in samples])
    energy = np.cumsum(spectra**2, axis=-1) / np.maximum((spectra**2).sum(-1, keepdims=True), 1e-300)
    mean = energy.mean(axis=0)  # [C, n]
    ranks = np.arange(1, mean.shape[-1] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for c, colour in zip(range(mean.shape[0]), ("tab:red", "tab:green", "tab:blue")):
        ax.plot(ranks, mean[c], color=colour, label=f"channel {c}")
    ax.set_xlabel("rank k")
    ax.set_ylabel("mean energy retained")
    ax.set_title(f"{_title(split)}: {len(spectra)} images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _grid_path(split: str, below: tuple[str, ...], out: Path | None, several: bool) -> Path:
    """Where a split's grid goes (``below``: the split's folders below ROOT). Without ``out``, ``preview.png``
    in the split's folder, or for a remote split in the current folder (a local path derived from a URL would
    make folders nobody asked for), named as ``out=preview.png`` would be. With ``out``: ``out`` itself when it
    is the only split; with several splits ``out``'s stem + ``-<dataset>-<split>`` + its suffix (one file
    each: a shared name would keep only the last split), with any folders between ROOT and the dataset in
    front, so two runs under one ROOT (a/cifar10/train, b/cifar10/train) stay apart."""
    if out is None and not is_url(split):
        return Path(split) / DEFAULT_NAME
    out = Path(DEFAULT_NAME) if out is None else out
    if not several:
        return out
    parts = below if len(below) >= 2 else (basename(parent(split)), basename(split))  # ROOT is the split or dataset
    return out.with_name("-".join((out.stem, *parts)) + out.suffix)


def write_previews(root: str | Path, count: int = 6, out: Path | None = None,
                   show_progress: bool = False) -> list[Path]:
    """Grid and energy plot per split below ``root`` (a folder or URL); returns the files written. Where each
    grid goes is ``_grid_path``'s rule; the energy plot goes beside it as ``<grid stem>-energy.png``.
    ``show_progress``: a bar with rate and ETA on stderr, counting variants read."""
    splits = _splits(str(root))
    if not splits:
        raise RankshardError(f"{root}: no materialized variants (manifest.json) below it")
    written = []
    total = sum(len(_grid_variants(names)) + ("spectra" in names) for _, names in splits.values())
    progress = Progress(total, "preview", unit="variant", enabled=show_progress)
    for split, (below, names) in splits.items():
        base = _grid_path(split, below, out, several=len(splits) > 1)
        base.parent.mkdir(parents=True, exist_ok=True)  # --out into a folder not made yet
        written.append(variant_grid(split, names, count, base, progress))
        if "spectra" in names:
            written.append(energy_plot(split, names["spectra"], base.with_name(base.stem + "-energy.png")))
            progress.update(1)
    progress.close()
    return written
