#!/usr/bin/env bash
# mypy --strict over the installed package layout. The components live in their own folders
# (inference_pod/, router/, operator/) but import as imagefleet.<component>; mypy follows import
# names, so check a tree of links that has the installed shape.
set -euo pipefail
mypy=${1:-mypy}
case $mypy in */*) mypy=$(realpath "$mypy");; esac
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$root/build/typecheck
rm -rf "$tree" && mkdir -p "$tree/imagefleet"
for f in "$root"/imagefleet/*; do ln -s "$f" "$tree/imagefleet/$(basename "$f")"; done
ln -s "$root/inference_pod" "$tree/imagefleet/inference_pod"
ln -s "$root/router" "$tree/imagefleet/router"
ln -s "$root/operator" "$tree/imagefleet/operator"
cd "$tree"
exec "$mypy" --config-file "$root/pyproject.toml" -p imagefleet
