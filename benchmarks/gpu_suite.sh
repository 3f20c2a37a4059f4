#!/usr/bin/env bash
# Every GPU check the issues ask for, for a session lent a GPU machine (e.g. the H200), in a few calls.
#
#   bash benchmarks/gpu_suite.sh tests engine eval     # one call (well under 10 minutes)
#   bash benchmarks/gpu_suite.sh weights train pipeline loader # another
#   bash benchmarks/gpu_suite.sh encodings decode      # factors-K reconstructed on the GPU by the loader;
#                                                      # nvJPEG decode vs the CPU decoder
#
# JSON results land in benchmarks/results/ (named after the device), logs and nvidia-smi's description of the
# hardware in benchmarks/results/gpu-logs/; when $OUT is set (the device tool), all of it is also packed into
# $OUT/gpu-suite.tgz (one file: the tool brings back at most 8). The GPU image has torch, torchvision and
# cupy but not webdataset/braceexpand: carry their wheels in .whl/ (see the device tool's README); they are
# installed here first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
logs=$results/gpu-logs
mkdir -p "$logs"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi > "$logs/gpu-hardware.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >> "$logs/gpu-hardware.txt" 2>&1

run() {  # run NAME CMD...: log to $logs/NAME.log, keep going on failure (report it)
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$logs/$name.log" 2>&1 || echo "   FAILED (exit $?), see $logs/$name.log"
  tail -n 3 "$logs/$name.log"
}

for stage in "$@"; do
  case $stage in
    tests)    run gpu-tests python3 -m pytest -q -m gpu -p no:cacheprovider ;;
    engine)   run bench-engine python3 benchmarks/bench_rank_engine.py --device cuda ;;
    eval)     run bench-spectrum python3 benchmarks/bench_spectrum.py --device cuda --images 1000
              run bench-pgd python3 benchmarks/bench_pgd.py --device cuda --variant imagenet --size 224 --batch 64
              run bench-rig python3 benchmarks/bench_rig.py --device cuda --arch resnet50 --variant imagenet \
                  --size 224 --width 64 --images 4 --batch-size 224
              run torchvision python3 benchmarks/crosscheck_torchvision.py --device cuda ;;
    weights)  run bench-operator python3 benchmarks/bench_operator.py --device cuda ;;
    train)    run bench-train python3 benchmarks/bench_train_step.py --device cuda ;;
    pipeline) run bench-imagenet python3 benchmarks/bench_imagenet_pipeline.py --workers "$(( $(nproc) - 1 ))" ;;
    loader)   run bench-loader python3 benchmarks/bench_loader.py --workers "$(nproc)" --out "$results/loader-gpu-host.json" ;;
    encodings) run bench-encodings python3 benchmarks/bench_encodings.py --device cuda ;;
    decode)   run bench-decode python3 benchmarks/bench_decode.py --device cuda --images 2000 ;;
    *)        echo "unknown stage $stage (tests engine eval weights train pipeline loader encodings decode)"; exit 2 ;;
  esac
done
[ -n "${OUT:-}" ] && tar czf "$OUT/gpu-suite.tgz" "$results"
exit 0
