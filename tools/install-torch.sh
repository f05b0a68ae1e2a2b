#!/usr/bin/env bash
# Install torch into the interpreter given as $1, unless it already has it.
#
# pip resolves it with whatever indexes and find-links it is configured with (pip.conf,
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS): a machine that keeps a CPU wheel in its
# find-links, or mirrors PyTorch's CPU index, gets the small CPU build; otherwise PyPI's default
# build (large, and it runs on a CPU too). Nothing here names an index of its own.
set -euo pipefail
py=${1:?usage: install-torch.sh PYTHON}
version=${TORCH_VERSION:-2.11.0}
if "$py" -P -c "import torch" 2>/dev/null; then
  echo "torch $("$py" -P -c 'import torch; print(torch.__version__)') already installed"; exit 0
fi
echo "installing torch==$version with pip's configured indexes and find-links"
exec "$py" -P -m pip install -q "torch==$version"
