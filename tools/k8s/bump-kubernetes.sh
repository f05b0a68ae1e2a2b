#!/usr/bin/env bash
# Points tools/k8s/kubernetes at another Kubernetes release:  tools/k8s/bump-kubernetes.sh v1.36.4
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0
# and maps them to ./staging with replace directives, which are ignored in a dependency. So the
# wrapper module replaces every one of them with the published v0.<minor>.<patch>. The list is
# taken from the release's own go.mod (every `k8s.io/* v0.0.0` requirement), as are its `go` and
# `godebug` lines, so the binaries keep upstream's runtime defaults. Review and commit the
# resulting go.mod and go.sum; `make k8s-tools` then builds into a new k8s-<version> cache.
set -euo pipefail

VERSION=${1:?usage: $0 v1.X.Y}
[[ $VERSION =~ ^v1\.[0-9]+\.[0-9]+$ ]] || { echo "not a release version: $VERSION" >&2; exit 2; }
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kubernetes"
STAGING="v0.${VERSION#v1.}"
export GOTOOLCHAIN=local

UPSTREAM=$(cd "$DIR" && go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p')
[[ -f $UPSTREAM ]] || { echo "could not fetch the go.mod of k8s.io/kubernetes@$VERSION" >&2; exit 1; }

{
	echo "module imagefleet.dev/tools/k8s/kubernetes"
	echo
	awk '$1 == "go" {print; exit}' "$UPSTREAM"
	echo
	awk '$1 == "godebug" {print; exit}' "$UPSTREAM"
	echo
	echo "tool ("
	for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
		printf '\tk8s.io/kubernetes/cmd/%s\n' "$cmd"
	done
	echo ")"
	echo
	echo "require k8s.io/kubernetes $VERSION"
	echo
	echo "replace ("
	awk -v v="$STAGING" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {printf "\t%s => %s %s\n", $1, $1, v}' "$UPSTREAM"
	echo ")"
} >"$DIR/go.mod.new"
mv "$DIR/go.mod.new" "$DIR/go.mod"
(cd "$DIR" && go mod tidy)
echo "tools/k8s/kubernetes now builds Kubernetes $VERSION (staging modules at $STAGING)"
