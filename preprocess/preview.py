"""``rankshard-preprocess preview``: the same images across every variant (the paper's Figure 3)
and the mean retained energy vs rank computed from the stored spectra."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from rankshard.preprocess.format.codec import decode_image, decode_npy
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.format.tarindex import read_shard


def _first_samples(folder: Path, count: int) -> list[tuple[str, dict]]:
    """The first ``count`` samples of a variant, reading only as many shards as that takes."""
    samples: list[tuple[str, dict]] = []
    for shard in read_json(folder / "manifest.json")["shards"]:
        if len(samples) >= count:
            break
        samples += read_shard(folder / shard["name"])
    return samples[:count]


def _split_dirs(root: Path) -> list[Path]:
    return sorted({p.parent.parent for p in root.rglob("manifest.json")})


def _displayable(folder: Path, members: dict) -> np.ndarray:
    img = decode_image(members)
    if folder.name.startswith(("high-", "highpass-")):
        # high-rank images are small and centred on zero: mid-grey plus contrast stretched to max |value|
        return 0.5 + 0.5 * img / max(float(np.abs(img).max()), 1e-6)
    return np.clip(img, 0, 1)


def _grid_folders(split_dir: Path) -> list[Path]:
    """The image variants of a split in display order: full, low rank, high rank, factors, others."""
    folders = [f for f in sorted(split_dir.iterdir()) if (f / "manifest.json").exists() and f.name != "spectra"]
    order = {"full": 0, "rank": 1, "high": 2, "factors": 3, "lowpass": 4, "highpass": 5}
    return sorted(folders, key=lambda f: (order.get(f.name.split("-")[0], 4), f.name))


def variant_grid(split_dir: Path, count: int, out: Path, progress: Progress | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folders = _grid_folders(split_dir)
    fig, axes = plt.subplots(count, len(folders), figsize=(1.3 * len(folders), 1.3 * count + 0.4), squeeze=False)
    for col, folder in enumerate(folders):
        for row, (key, members) in enumerate(_first_samples(folder, count)):
            ax = axes[row, col]
            ax.imshow(_displayable(folder, members), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(folder.name, fontsize=8)
            if col == 0:
                ax.set_ylabel(key, fontsize=6)
        if progress:
            progress.update(1)
    fig.suptitle(f"{split_dir.parent.name}/{split_dir.name}: same images per variant (high rank: grey = 0, stretched to max |value|)",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def energy_plot(split_dir: Path, out: Path) -> Path | None:
    """Mean share of squared singular values kept by rank k, per channel, from the spectra variant."""
    folder = split_dir / "spectra"
    if not (folder / "manifest.json").exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spectra = np.stack([decode_npy(m["s.npy"]).astype(np.float64) for _, m in _first_samples(folder, 4096)])
    energy = np.cumsum(spectra**2, axis=-1) / np.maximum((spectra**2).sum(-1, keepdims=True), 1e-300)
    mean = energy.mean(axis=0)  # [C, n]
    ranks = np.arange(1, mean.shape[-1] + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for c, colour in zip(range(mean.shape[0]), ("tab:red", "tab:green", "tab:blue")):
        ax.plot(ranks, mean[c], color=colour, label=f"channel {c}")
    ax.set_xlabel("rank k")
    ax.set_ylabel("mean energy retained")
    ax.set_title(f"{split_dir.parent.name}/{split_dir.name}: {len(spectra)} images", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _grid_path(root: Path, split_dir: Path, out: Path | None, several: bool) -> Path:
    """Where a split's grid goes: ``out`` itself when it is the only split; with several splits ``out``'s stem
    + ``-<dataset>-<split>`` + its suffix (one file each: a shared name would keep only the last split), with
    any folders between ROOT and the dataset in front, so two runs under one ROOT (a/cifar10/train,
    b/cifar10/train) stay apart; without ``out``, ``preview.png`` in the split's folder."""
    if out is None:
        return split_dir / "preview.png"
    if not several:
        return out
    parts = split_dir.relative_to(root).parts
    parts = parts if len(parts) >= 2 else (split_dir.parent.name, *parts)  # ROOT is the dataset's folder
    return out.with_name("-".join((out.stem, *parts)) + out.suffix)


def write_previews(root: str | Path, count: int = 6, out: Path | None = None,
                   show_progress: bool = False) -> list[Path]:
    """Grid and energy plot per split below ``root``; returns the files written. Where each grid goes is
    ``_grid_path``'s rule; the energy plot goes beside it as ``<grid stem>-energy.png``. ``show_progress``: a
    bar with rate and ETA on stderr, counting variants read."""
    root = Path(root)
    splits = _split_dirs(root) or ([root.parent] if (root / "manifest.json").exists() else [])
    if not splits:
        raise RankshardError(f"{root}: no materialized variants (manifest.json) below it")
    written = []
    total = sum(len(_grid_folders(s)) + (s / "spectra" / "manifest.json").exists() for s in splits)
    progress = Progress(total, "preview", unit="variant", enabled=show_progress)
    for split_dir in splits:
        base = _grid_path(root, split_dir, out, several=len(splits) > 1)
        base.parent.mkdir(parents=True, exist_ok=True)  # --out into a folder not made yet
        written.append(variant_grid(split_dir, count, base, progress))
        energy = energy_plot(split_dir, base.with_name(base.stem + "-energy.png"))
        if energy:
            written.append(energy)
            progress.update(1)
    progress.close()
    return written
