"""Minimal pure-torch reproduction of issue 12 item 5: training a width-4 ResNet on CPU hangs or crashes.

Where it happened (gdb on the hung `rankshard-train --arch resnet18 --width 4`, torch 2.13.0+cpu, oneDNN
v3.12, 2 OpenMP threads): the main thread waited in ``gomp_team_barrier_wait_end`` while one OpenMP thread
spun forever inside ``dnnl::impl::cpu::x64::jit_avx2_1x1_convolution_bwd_weights_t::
execute_backward_weights`` - the oneDNN JIT kernel for the weight gradient of 1x1 convolutions, which a
width-4 ResNet has with 4-32 channels (fewer than one AVX2 register of floats for the stem width). Other
runs of the same job ended in SIGSEGV / heap corruption in ``loss.backward()``; width 8 never did. The
code involved is torch's bundled oneDNN, not ours: nothing in rankshard's model is unusual for a 1x1
convolution. This script needs nothing from rankshard:

    python benchmarks/repro_narrow_conv.py [--cin 4 --cout 8 --stride 2 --steps 200 --tries 4]

Each try runs in a fresh process (a segfault or a hang can't take the script down) with a watchdog; it
prints, per try, ok / hung / crashed and the exit status. Under CPU contention (other processes busy on
the same cores) the hang appears more often; on an idle machine it may take many tries or not appear.
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys, torch
cin, cout, stride, steps = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
conv = torch.nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
x = torch.randn(128, cin, 32, 32, requires_grad=True)
for _ in range(steps):
    conv(x).square().mean().backward()
print("ok", torch.__version__, torch.backends.mkldnn.is_available())
"""


def one_try(args) -> str:
    cmd = [sys.executable, "-c", CHILD, str(args.cin), str(args.cout), str(args.stride), str(args.steps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.watchdog)
    except subprocess.TimeoutExpired:
        return f"hung (no result after {args.watchdog} s)"
    if out.returncode == 0:
        return "ok"
    return f"crashed (exit status {out.returncode}): {out.stderr.strip()[-300:]}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cin", type=int, default=4)
    p.add_argument("--cout", type=int, default=8)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--watchdog", type=float, default=300.0, help="seconds before a try counts as hung")
    args = p.parse_args()
    outcomes = [one_try(args) for _ in range(args.tries)]
    for i, o in enumerate(outcomes):
        print(f"try {i + 1}: {o}")
    sys.exit(0 if all(o == "ok" for o in outcomes) else 1)


if __name__ == "__main__":
    main()
