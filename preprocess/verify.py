"""``rankshard-preprocess verify``: check shards against their manifests and ranks against float64 SVD."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rankshard.preprocess.format.codec import decode_image, decode_npy, sample_label
from rankshard.preprocess.rank.engine import reference_low_rank
from rankshard.preprocess.rank.lowpass import lowpass_matrix
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.format.tar import sha256_file
from rankshard.preprocess.format.tarindex import read_shard
from rankshard.preprocess.spec import FORMAT

# Stored value vs float64 reference: engine error (1e-4) plus the storage's own rounding.
TOLERANCE = {"png": 0.5 / 255 + 2e-4, "raw": 0.5 / 255 + 2e-4, "npy": 1.5e-3, "factors": 1e-2}


@dataclass
class VariantCheck:
    folder: Path
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


def _check_shards(folder: Path, manifest: dict, check: VariantCheck, progress: Progress) -> dict[str, dict[str, bytes]]:
    """Hash, parse and decode every shard; returns the first samples for the reference check."""
    listed = {s["name"] for s in manifest["shards"]}
    for extra in sorted(p.name for p in folder.glob("*.tar") if p.name not in listed):
        check.problems.append(f"{folder / extra}: shard not in the manifest")
    head: dict[str, dict[str, bytes]] = {}
    expected_index = None
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        progress.update(shard["num_samples"])
        if not path.exists():
            check.problems.append(f"{path}: missing; rerun the preprocess command to rewrite it")
            continue
        if sha256_file(path) != shard["sha256"]:
            check.problems.append(f"{path}: sha256 mismatch (expected {shard['sha256'][:16]}...); "
                                  "rerun the preprocess command after deleting this file")
            continue
        try:
            samples = read_shard(path)
        except RankshardError as exc:  # the hash matched a damaged file: the manifest was written over it
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


def _check_sample(path: Path, key: str, members: dict, previous: int | None, classes: int,
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


# what verify reads from a manifest; a manifest.json without them (another tool's, or a hand-edited one) is
# reported as a problem of its folder instead of ending the whole run with a KeyError
MANIFEST_KEYS = ("shards", "num_samples", "mode", "rank", "encoding", "config")


def _manifest_problem(folder: Path, manifest) -> str | None:
    path = folder / "manifest.json"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return (f"{path}: not a rankshard manifest (format {found!r}, expected {FORMAT!r}); move it out of the "
                "tree or rerun the preprocess command that made this folder")
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    shards_ok = isinstance(manifest.get("shards"), list) and all(
        isinstance(s, dict) and {"name", "num_samples", "sha256"} <= s.keys() for s in manifest["shards"])
    if missing or not shards_ok:
        what = f"no {', '.join(missing)}" if missing else "a shard entry without name, num_samples or sha256"
        return f"{path}: incomplete manifest ({what}); delete it and rerun the preprocess command that made it"
    return None


def verify_tree(root: str | Path, reference_samples: int = 16, show_progress: bool = False) -> VerifyReport:
    """Verify every variant folder (one holding ``manifest.json``) below ``root``; ``show_progress`` draws a
    bar with rate and ETA on stderr (samples of all variants)."""
    folders = sorted(p.parent for p in Path(root).rglob("manifest.json"))
    if not folders:
        raise RankshardError(f"{root}: no manifest.json below it; is this a rankshard output folder?")
    manifests = {folder: read_json(folder / "manifest.json") for folder in folders}
    unusable = {folder: _manifest_problem(folder, m) for folder, m in manifests.items()}
    checks = [VariantCheck(folder, problems=[problem]) for folder, problem in unusable.items() if problem]
    manifests = {folder: m for folder, m in manifests.items() if not unusable[folder]}
    progress = Progress(sum(m["num_samples"] for m in manifests.values()), "verify", enabled=show_progress)
    heads = {}
    for folder in manifests:
        check = VariantCheck(folder)
        heads[folder] = _check_shards(folder, manifests[folder], check, progress)
        checks.append(check)
    progress.close()
    for check in checks:
        manifest = manifests.get(check.folder)
        if manifest is None:  # an unusable manifest, already reported
            continue
        full = heads.get(check.folder.parent / "full")
        if manifest["mode"] in ("low", "high", "spectra", "factors", "lowpass", "highpass") and full and reference_samples:
            _reference_check(manifest, heads[check.folder], full, reference_samples, check)
    return VerifyReport(sorted(checks, key=lambda c: c.folder))


def print_report(report: VerifyReport) -> None:
    for c in report.checks:
        status = "ok" if not c.problems else "FAILED"
        err = f"max err {c.max_error:.1e}" if c.max_error is not None else ""
        print(f"{status:6} {c.folder}  {c.shards} shards  {c.samples} samples  {err}")
        for p in c.problems:
            print(f"       - {p}")
    print("all variants verified" if report.ok else "verification FAILED")
