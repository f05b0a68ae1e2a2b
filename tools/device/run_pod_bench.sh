#!/usr/bin/env bash
# Run the pod benchmarks on an accelerator machine (docs/benchmarks.md explains each one).
#
# Expects the wheels of .whl/ (diffusers and friends, and imagefleet itself: see
# tools/device/prepare_wheels.sh) installed into /tmp/site, which the calling command does first:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
#   bash tools/device/run_pod_bench.sh smoke|full|throughput|seed|mixed|scaling|cpu-smoke [extra bench flags]
#
# The benchmarks run from a scratch directory, never from the checkout: the checkout's imagefleet/
# folder (the core package alone) would shadow the installed distribution, whose
# imagefleet.inference_pod lives elsewhere in the tree. Results and logs go to $OUT.
set -uo pipefail

mode=${1:-smoke}
shift || true
py=${PYTHON:-python3}
repo=$(pwd)
site=${SITE:-/tmp/site}
out=${OUT:-$repo/.out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$site
# pip --target runs no .pth file: this is the folder the CuTe DSL's adds (FlashAttention-4, install_fa4.sh)
[ -d "$site/nvidia_cutlass_dsl/dsl_packages" ] && export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages
export BENCH_LOG_DIR=/tmp/imagefleet-pod-logs
mkdir -p "$BENCH_LOG_DIR"

# bench/ is not part of the wheel, and older wheels lack imagefleet.testing: bring them in.
rm -rf "$site/bench" && cp -r "$repo/bench" "$site/bench"
[ -d "$site/imagefleet/testing" ] || cp -r "$repo/imagefleet/testing" "$site/imagefleet/testing"

run=$(mktemp -d /tmp/bench-run.XXXX)
cd "$run" || exit 1

collect_logs() {
    tar -czf "$out/pod_logs.tgz" -C "$BENCH_LOG_DIR" . 2>/dev/null || true
}
trap collect_logs EXIT

echo "== $(date -u +%FT%TZ) mode=$mode"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,temperature.gpu \
    --format=csv 2>&1 | tee "$out/nvidia_smi.txt"
"$py" - <<'PY'
import importlib
for name in ("torch", "diffusers", "transformers", "huggingface_hub", "tokenizers", "openai", "aiohttp",
             "imagefleet", "imagefleet.inference_pod.synthetic", "imagefleet.testing.servers", "bench.common"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "?"), module.__file__)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)
PY

case "$mode" in
    smoke)
        # Loads synthetic:sd3.5-medium (bare and in pods), serves requests through HTTP and the
        # openai client, at 2 steps: checks the whole path and times pod start-up.
        "$py" -m bench.pod_throughput --steps 2 --batch-sizes 1,2 --batches 2 --bare-batches 1 "$@" \
            2>&1 | tee "$out/smoke_throughput.log" | grep -v "should be kept in float32"
        "$py" -m bench.seed_test --steps 2 --no-unbatched "$@" \
            2>&1 | tee "$out/smoke_seed.log" | grep -v "should be kept in float32"
        ;;
    throughput)
        # TAG names this run's log (pod_throughput_TAG.log) when one call makes several runs
        "$py" -m bench.pod_throughput "$@" 2>&1 | tee "$out/pod_throughput${TAG:+_$TAG}.log" \
            | grep -v "should be kept in float32"
        ;;
    seed)
        "$py" -m bench.seed_test "$@" 2>&1 | tee "$out/seed_test.log" | grep -v "should be kept in float32"
        ;;
    full)
        "$py" -m bench.pod_throughput "$@" 2>&1 | tee "$out/pod_throughput.log" | grep -v "should be kept in float32"
        "$py" -m bench.seed_test 2>&1 | tee "$out/seed_test.log" | grep -v "should be kept in float32"
        ;;
    mixed)
        # Mixed sizes under Poisson load, per batching policy: one model per call (docs/benchmarks.md).
        "$py" -m bench.mixed_load "$@" 2>&1 | tee -a "$out/mixed_load.log" | grep -v "should be kept in float32"
        ;;
    scaling)
        # Several GPUs: one pod per GPU behind the router, N = 1, 2, 4 (8), then the seed's burst.
        "$py" -m bench.scaling "$@" 2>&1 | tee "$out/scaling.log" | grep -v "should be kept in float32"
        ;;
    cpu-smoke)
        # The same path on a machine without a GPU, with the tiny model.
        "$py" -m bench.pod_throughput --model tiny --size 64x64 --steps 4 --batch-sizes 1,2 "$@"
        "$py" -m bench.seed_test --model tiny --size 64x64 --steps 4 "$@"
        ;;
    *)
        echo "unknown mode $mode (smoke, full, throughput, seed, mixed, scaling, cpu-smoke)" >&2
        exit 2
        ;;
esac
echo "== $(date -u +%FT%TZ) done"
