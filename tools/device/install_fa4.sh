#!/usr/bin/env bash
# Put FlashAttention-4 together on the accelerator machine from prepare_fa4.sh's two pieces, which
# come in two device calls made while the machine stays warm (it keeps /tmp between them):
#
#   bash tools/device/install_fa4.sh stage    # first call, .whl carried: wheels into /tmp/fa4site
#   bash tools/device/install_fa4.sh finish   # second call, build/fa4ir carried: completes it, then
#                                             # copies it into /tmp/site and checks that it imports
#
# run_pod_bench.sh puts the CuTe DSL's package folder on PYTHONPATH (pip --target runs no .pth file).
set -euo pipefail
mode=${1:?stage or finish}
py=${PYTHON:-python3}
repo=$(pwd)
stage=/tmp/fa4site
site=${SITE:-/tmp/site}
runtime=nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so
mlir=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
unxz_py() { "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
case "$mode" in
    stage)
        rm -rf "$stage" && mkdir -p "$stage"
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$stage" "$repo"/.whl/fa4/*.whl
        tar -xzf "$repo/.whl/fa4/cu13-rest.tgz" -C "$stage"
        unxz_py "$repo/.whl/fa4/runtime.so.xz" "$stage/$runtime"
        echo "fa4 staged in $stage: $(du -sh "$stage" | cut -f1)"
        ;;
    finish)
        [ -f "$stage/$runtime" ] || { echo "no $stage/$runtime: the staging call's machine is gone" >&2; exit 3; }
        unxz_py "$repo/build/fa4ir/mlir.so.xz" "$stage/$mlir"
        mkdir -p "$site" && cp -a "$stage/." "$site/"
        PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages "$py" -c \
            "import torch, flash_attn.cute.interface; print('fa4 imports; torch impls:', torch.nn.attention.list_flash_attention_impls())"
        ;;
    *) echo "usage: $0 stage|finish" >&2; exit 2 ;;
esac
