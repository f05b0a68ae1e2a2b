#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4 and NVIDIA's CuTe DSL it runs on) for the accelerator machine, in
# two pieces: its CUDA 13 library wheel (92 MB) is larger than one device call can carry (64 MiB),
# so the MLIR library inside it goes in a second call. install_fa4.sh puts them together there.
#
#   bash tools/device/prepare_fa4.sh [python]
#     .whl/fa4/      carried with .whl by the first call (install_fa4.sh stage): the small wheels,
#                    the CUDA 13 wheel's other files, its runtime library (xz)
#     build/fa4ir/   carried by the second call (install_fa4.sh finish): the MLIR library (xz, 48 MiB)
set -euo pipefail
py=${1:-python3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
fa4=$repo/.whl/fa4
ir=$repo/build/fa4ir
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$fa4" "$ir" && mkdir -p "$fa4" "$ir"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d "$work" \
    flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
    torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
mv "$work"/*.whl "$fa4"/
mkdir "$work/cu13"
(cd "$work/cu13" && unzip -q "$fa4"/nvidia_cutlass_dsl_libs_cu13-*.whl)
rm "$fa4"/nvidia_cutlass_dsl_libs_cu13-*.whl
runtime=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
mlir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
xz -9e -T0 -c "$work/cu13/$runtime" >"$fa4/runtime.so.xz"
xz -9e -T0 -c "$work/cu13/$mlir" >"$ir/mlir.so.xz"
rm "$work/cu13/$runtime" "$work/cu13/$mlir"
tar -czf "$fa4/cu13-rest.tgz" -C "$work/cu13" .
du -sh "$fa4" "$ir"
