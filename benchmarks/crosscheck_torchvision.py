"""Cross-check: our ResNet-50/18 given torchvision's weights layout produce torchvision's logits.

torchvision does not import with the CPU torch build of the development machines, so this runs where it
does (the GPU machines). Random weights are copied key by key from torchvision's model into ours; both run
in fp32 eval mode on the same batch (ours normalizes inside, torchvision's input is normalized outside).

    python benchmarks/crosscheck_torchvision.py [--device cuda] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rankshard.train.models import IMAGENET_MEAN, IMAGENET_STD, build_model  # noqa: E402

TOLERANCE = 1e-4  # max |logit difference| in fp32


def max_logit_difference(arch: str, device: torch.device, batch: int) -> float:
    import torchvision

    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None).to(device).eval()
    ours = build_model(arch, "imagenet", 1000).to(device).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # identical key names and shapes, or this raises
    x = torch.rand(batch, 3, 224, 224, device=device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        return float((ours(x) - theirs((x - mean) / std)).abs().max())


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    # TF32 would make both sides differ by ~1e-3 for reasons unrelated to the architecture
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    import torchvision

    diffs = {arch: max_logit_difference(arch, device, args.batch) for arch in ("resnet50", "resnet18")}
    result = {"check": "torchvision_logits", "max_abs_logit_difference": diffs, "tolerance": TOLERANCE,
              "passed": all(d <= TOLERANCE for d in diffs.values()),
              "provenance": {"device": str(device), "torch": torch.__version__,
                             "torchvision": torchvision.__version__, "python": platform.python_version(),
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    out = Path(__file__).parent / "results" / f"torchvision_crosscheck-{device.type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
