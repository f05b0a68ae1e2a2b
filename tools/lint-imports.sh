#!/usr/bin/env bash
# Import contracts (.importlinter) over the installed package layout. The components live in their
# own folders but import as imagefleet.<component>, and import-linter reads a package from disk,
# so check a copy with the installed shape (what `pip install` builds, without the dependencies).
set -euo pipefail
lint=${1:-lint-imports}
case $lint in */*) lint=$(realpath "$lint");; esac
root=$(cd "$(dirname "$0")/.." && pwd)
py=$(dirname "$lint")/python
tree=$root/build/layers
rm -rf "$tree"
"$py" -m pip install -q --no-deps --no-build-isolation --no-compile --target "$tree" "$root" >/dev/null
rm -rf "$tree"/imagefleet-*.dist-info "$tree/bin"
cd "$tree"
PYTHONPATH=$tree exec "$lint" --no-cache "$root/.importlinter"
