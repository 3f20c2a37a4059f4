"""``rankshard-preprocess verify``: check shards against their manifests and ranks against float64 SVD.

ROOT is a local folder or a URL, walked by ``format/tree.py`` (as ``ls`` and ``preview`` walk theirs): object
storage that can list (``s3://``, other fsspec protocols) like a folder; over HTTP, which cannot list, ROOT
must name a variant folder (the one holding manifest.json) or a split folder (the variants its
``.rankshard-config.json`` names that have their manifest are verified). Remote shards are fetched whole and
checked against the manifest's size and sha256 as they arrive.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankshard.preprocess.format.codec import decode_image, decode_npy, sample_label
from rankshard.preprocess.rank.engine import reference_low_rank
from rankshard.preprocess.rank.lowpass import lowpass_matrix
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import manifest_problem, read_json
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.format.tar import sha256_file
from rankshard.preprocess.format.tarindex import read_shard
from rankshard.preprocess.format.transport import is_url, join, parent
from rankshard.preprocess.format.tree import MANIFEST, can_list, files_below, folders_holding, named_split, within
from rankshard.preprocess.spec import FORMAT

# Stored value vs float64 reference: engine error (1e-4) plus the storage's own rounding.
TOLERANCE = {"png": 0.5 / 255 + 2e-4, "raw": 0.5 / 255 + 2e-4, "npy": 1.5e-3, "factors": 1e-2}


@dataclass
class VariantCheck:
    folder: str  # a local path or a URL
    samples: int = 0
    shards: int = 0
    max_error: float | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    checks: list[VariantCheck]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and not any(c.problems for c in self.checks)


def _shards_present(files: dict[str, int] | None) -> list[str]:
    """Names of the shards in a variant folder (``files``: below it; None where nothing can be listed: HTTP)."""
    return sorted(n for n in files or () if n.endswith(".tar") and "/" not in n)


def _read_samples(path: str, shard: dict) -> list[tuple[str, dict[str, bytes]]]:
    """The shard's samples once its bytes match the manifest; RankshardError naming what is wrong."""
    if is_url(path):  # fetched whole, size and sha256 checked as it arrives (transport.fetch)
        return read_shard(path, shard["sha256"], shard.get("bytes"))
    if not Path(path).exists():
        raise RankshardError(f"{path}: missing; rerun the preprocess command to rewrite it")
    if sha256_file(path) != shard["sha256"]:
        raise RankshardError(f"{path}: sha256 mismatch (expected {shard['sha256'][:16]}...); rerun the preprocess "
                             "command after deleting this file")
    return read_shard(path)  # the hash may match a damaged file: the manifest was written over it


def _check_shards(folder: str, files: dict[str, int] | None, manifest: dict, check: VariantCheck,
                  progress: Progress) -> dict[str, dict[str, bytes]]:
    """Hash, parse and decode every shard (``files``: what is listed below ``folder``); returns the first
    samples for the reference check."""
    listed = {s["name"] for s in manifest["shards"]}
    for extra in (n for n in _shards_present(files) if n not in listed):
        check.problems.append(f"{join(folder, extra)}: shard not in the manifest")
    head: dict[str, dict[str, bytes]] = {}
    expected_index = None
    for shard in manifest["shards"]:
        path = join(folder, shard["name"])
        progress.update(shard["num_samples"])
        try:
            samples = _read_samples(path, shard)
        except RankshardError as exc:
            check.problems.append(str(exc))
            continue
        check.shards += 1
        if len(samples) != shard["num_samples"]:
            check.problems.append(f"{path}: {len(samples)} samples, manifest says {shard['num_samples']}")
        for key, members in samples:
            expected_index = _check_sample(path, key, members, expected_index, len(manifest["classes"]), check)
            if len(head) < 64:
                head[key] = members
        check.samples += len(samples)
    if check.samples != manifest["num_samples"]:
        check.problems.append(f"{folder}: {check.samples} samples in shards, manifest says {manifest['num_samples']}")
    return head


def _check_sample(path: str, key: str, members: dict, previous: int | None, classes: int,
                  check: VariantCheck) -> int:
    try:
        record = json.loads(members["json"])
        index, number = record["index"], int(key)  # a key that is no number, a json without index: findings too
        label = sample_label(members)  # the loaders' rule: .cls, cross-checked against the json's label
        if not 0 <= label < classes:
            raise ValueError(f"label {label} is not a class of the manifest (0..{classes - 1})")
        if "s.npy" in members and "u.npy" not in members:
            decode_npy(members["s.npy"])
        else:
            decode_image(members)
    except Exception as exc:  # any decode failure is a finding, not a crash
        check.problems.append(f"{path}: sample {key} does not decode ({type(exc).__name__}: {exc})")
        return previous or 0
    if index != number or (previous is not None and number <= previous):
        check.problems.append(f"{path}: sample {key} out of order or mislabelled (index {index})")
    return number


def _frequency_reference(x: np.ndarray, mode: str, k: int) -> np.ndarray:
    """float64 k x k low-pass of x [C, H, W] (``highpass`` is then ``x -`` this, like high rank)."""
    return lowpass_matrix(x.shape[1], k) @ x @ lowpass_matrix(x.shape[2], k).T


def _reference_check(manifest: dict, head: dict, full: dict, count: int, check: VariantCheck) -> None:
    """Recompute low/high rank (or spectra) from the full variant with float64 numpy and compare."""
    mode, k = manifest["mode"], manifest["rank"]
    errors = []
    for key in list(head)[:count]:
        if key not in full:
            continue
        x = decode_image(full[key]).transpose(2, 0, 1)[None].astype(np.float64)
        if mode == "spectra":
            s_ref = np.linalg.svd(x[0], compute_uv=False)
            s = decode_npy(head[key]["s.npy"]).astype(np.float64)
            errors.append(float(np.max(np.abs(s - s_ref)) / max(s_ref.max(), 1e-12)))
            continue
        ref = _frequency_reference(x[0], mode, k) if mode in ("lowpass", "highpass") else reference_low_rank(x, k)[0]
        if mode in ("high", "highpass"):
            ref = x[0] - ref
        elif manifest["encoding"] in ("png", "raw"):
            ref = np.clip(ref, 0, 1)
        stored = decode_image(head[key]).transpose(2, 0, 1)
        errors.append(float(np.max(np.abs(stored - ref))))
    if not errors:
        return
    check.max_error = max(errors)
    # spectra are compared relative to s1; a float16 full variant itself carries ~5e-4 of rounding
    spectra_tol = 1e-4 if manifest["config"]["encoding"] in ("png", "raw") else 2e-3
    tol = spectra_tol if mode == "spectra" else TOLERANCE[manifest["encoding"]]
    if check.max_error > tol:
        check.problems.append(f"{check.folder}: max error {check.max_error:.2e} against the float64 "
                              f"reference exceeds {tol:.1e}")


def _manifest_problem(folder: str, manifest) -> str | None:
    """A manifest.json that is not ours (another tool's) or is damaged, as a problem of its folder instead of
    an error ending the whole run."""
    path = join(folder, "manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return (f"{path}: not a rankshard manifest (format {found!r}, expected {FORMAT!r}); move it out of the "
                "tree or rerun the preprocess command that made this folder")
    return manifest_problem(path, manifest)


def verify_tree(root: str | Path, reference_samples: int = 16, show_progress: bool = False) -> VerifyReport:
    """Verify every variant folder (one holding ``manifest.json``) below ``root``; ``show_progress`` draws a
    bar with rate and ETA on stderr (samples of all variants)."""
    found = _variant_folders(str(root))  # folder -> (the files below it or None, its manifest if already read)
    if not found:
        raise RankshardError(f"{root}: no manifest.json below it; is this a rankshard output folder?")
    folders = {folder: files for folder, (files, _) in found.items()}
    manifests = {folder: read_json(join(folder, MANIFEST)) if m is None else m for folder, (_, m) in found.items()}
    unusable = {folder: _manifest_problem(folder, m) for folder, m in manifests.items()}
    checks = [VariantCheck(folder, problems=[problem]) for folder, problem in unusable.items() if problem]
    manifests = {folder: m for folder, m in manifests.items() if not unusable[folder]}
    progress = Progress(sum(m["num_samples"] for m in manifests.values()), "verify", enabled=show_progress)
    heads = {}
    for folder in manifests:
        check = VariantCheck(folder)
        heads[folder] = _check_shards(folder, folders[folder], manifests[folder], check, progress)
        checks.append(check)
    progress.close()
    for check in checks:
        manifest = manifests.get(check.folder)
        if manifest is None:  # an unusable manifest, already reported
            continue
        full = heads.get(join(parent(check.folder), "full"))
        if manifest["mode"] in ("low", "high", "spectra", "factors", "lowpass", "highpass") and full and reference_samples:
            _reference_check(manifest, heads[check.folder], full, reference_samples, check)
    return VerifyReport(sorted(checks, key=lambda c: c.folder))


def _variant_folders(root: str) -> dict[str, tuple[dict[str, int] | None, dict | None]]:
    """Every folder holding a manifest.json below ``root`` (a local folder, or a URL; see the module), with the
    files below it (None over HTTP, where nothing can be listed) and its manifest where finding the folder
    already read it (an HTTP split folder: each request once)."""
    if not can_list(root):
        split = named_split(root)  # refuses a URL that names neither a variant nor a split folder
        if split.variant:
            return {root: (None, None)}
        return {join(split.url, name): (None, manifest) for name, manifest in split.manifests().items() if manifest}
    files = files_below(root)
    return {join(root, rel): (within(files, rel), None) for rel in folders_holding(files, MANIFEST)}


def print_report(report: VerifyReport) -> None:
    for c in report.checks:
        status = "ok" if not c.problems else "FAILED"
        err = f"max err {c.max_error:.1e}" if c.max_error is not None else ""
        print(f"{status:6} {c.folder}  {c.shards} shards  {c.samples} samples  {err}")
        for p in c.problems:
            print(f"       - {p}")
    print("all variants verified" if report.ok else "verification FAILED")
