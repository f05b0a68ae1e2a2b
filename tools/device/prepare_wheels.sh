#!/usr/bin/env bash
# Fill .whl/ (ignored by git, carried to the accelerator machine) with what its image lacks for the
# pod benchmarks: diffusers, the transformers / huggingface_hub / tokenizers versions it is tested
# with, the openai client and their pure dependencies, and a wheel of imagefleet built from the
# working tree. Re-run before every device call so the imagefleet wheel is current.
#
#   bash tools/device/prepare_wheels.sh [python]     # python: the venv to build with (default python3)
set -euo pipefail
py=${1:-python3}
repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=$repo/.whl
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform any -d "$dest" \
    diffusers==0.42.1 transformers==5.24.0 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 \
    httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 importlib-metadata==10.2.0 \
    lazy-importer==0.1.0 openai==3.57.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 jiter==0.19.0 sniffio==1.3.1 typing-extensions==4.16.0 anyio==4.16.0
rm -f "$dest"/imagefleet-*.whl
"$py" -m pip wheel -q --no-deps -w "$dest" "$repo"
ls -1 "$dest"
du -sh "$dest"
