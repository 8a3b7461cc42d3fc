#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl from the Go module proxy at pinned versions into a
# cache outside the repository, once. Later runs only check `--version` and return. The test harness
# (tests/src/controlplane.rs) finds the binaries through the same cache path.
#
#   RUNWARDEN_CACHE   cache root (default ~/.cache/runwarden)
set -euo pipefail

# Pinned versions: change here and the next `make setup` rebuilds into a new directory.
# The harness reads them from this file, so there is one place to bump.
K8S_VERSION=v1.36.3
ETCD_VERSION=v3.6.16

cache="${RUNWARDEN_CACHE:-$HOME/.cache/runwarden}"
bin="$cache/k8s-$K8S_VERSION-etcd-$ETCD_VERSION/bin"
mkdir -p "$bin"

# Output is captured before matching: with pipefail, `cmd | grep -q` fails whenever grep exits
# before cmd has written everything (SIGPIPE), which made this check flaky.
version_of() { "$@" 2>/dev/null || true; }
have_etcd() { [[ "$(version_of "$bin/etcd" --version)" == *"etcd Version: ${ETCD_VERSION#v}"* ]]; }
have_k8s() {
  [[ "$(version_of "$bin/kube-apiserver" --version)" == *"Kubernetes $K8S_VERSION"* ]] &&
    [[ "$(version_of "$bin/kubectl" version --client)" == *"Client Version: $K8S_VERSION"* ]]
}

if have_etcd && have_k8s; then
  echo "control plane: etcd $ETCD_VERSION, kube-apiserver and kubectl $K8S_VERSION cached in $bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export GOFLAGS="-buildvcs=false -mod=mod"
export CGO_ENABLED=0

if ! have_etcd; then
echo "control plane: building etcd $ETCD_VERSION (first time only)"
mkdir -p "$work/etcd"
(
  cd "$work/etcd"
  go mod init runwarden.dev/build-etcd >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
)
fi

if ! have_k8s; then

echo "control plane: building kube-apiserver and kubectl $K8S_VERSION (first time only, 10-15 minutes)"
mkdir -p "$work/k8s"
(
  cd "$work/k8s"
  go mod init runwarden.dev/build-kube-apiserver >/dev/null 2>&1
  # k8s.io/kubernetes points its staging modules at ./staging; point them at the published
  # k8s.io/* v0.x.y releases of the same Kubernetes version instead.
  modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  staging_version="v0.${K8S_VERSION#v1.}"
  grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$modfile" | awk '{print $1}' | while read -r m; do
    go mod edit -replace "$m=$m@$staging_version"
  done
  go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy -e >/dev/null 2>&1 || true
  version_pkg=k8s.io/client-go/pkg/version
  ldflags="-s -w -X $version_pkg.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitVersion=$K8S_VERSION"
  go build -trimpath -ldflags "$ldflags" -o "$bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  go build -trimpath -ldflags "$ldflags" -o "$bin/kubectl" k8s.io/kubernetes/cmd/kubectl
)
fi

have_etcd && have_k8s || { echo "control plane: built binaries do not report the pinned versions" >&2; exit 1; }
echo "control plane: built into $bin"
