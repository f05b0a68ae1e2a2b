#!/usr/bin/env bash
# Install torch into the interpreter given as $1, cheapest source first:
#   1. a CPU wheel already on disk ($TORCH_WHEEL_DIR, e.g. /opt/wheels),
#   2. PyTorch's CPU index, when this machine can reach it,
#   3. PyPI (the CUDA build: large, but it runs on CPU too).
set -euo pipefail
py=${1:?usage: install-torch.sh PYTHON}
version=${TORCH_VERSION:-2.11.0}
dir=${TORCH_WHEEL_DIR:-/opt/wheels}
if "$py" -P -c "import torch" 2>/dev/null; then
  echo "torch $("$py" -c 'import torch; print(torch.__version__)') already installed"; exit 0
fi
shopt -s nullglob
wheels=("$dir"/torch-*+cpu*.whl)
if ((${#wheels[@]})); then
  echo "installing torch from ${wheels[-1]}"
  exec "$py" -P -m pip install -q "${wheels[-1]}"
fi
if curl -fsS -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then
  echo "installing torch==$version from PyTorch's CPU index"
  exec "$py" -P -m pip install -q "torch==$version" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi
echo "installing torch==$version from PyPI (no CPU wheel on disk, CPU index unreachable)"
exec "$py" -P -m pip install -q "torch==$version"
