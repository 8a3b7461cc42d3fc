#!/usr/bin/env bash
# `make setup`: installs what the build and the tests need, skipping what is already there.
# Safe to run again; CI runs it on every fresh machine.
set -euo pipefail

# Debian packages. openssl makes the test control plane's service-account key.
apt_packages=(openssl ca-certificates)
missing=()
# Outputs are captured before matching: with pipefail, `cmd | grep -q` can fail by SIGPIPE.
for p in "${apt_packages[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == *"install ok installed"* ]] || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Toolchains that come with the machine: check, with a clear message if absent.
command -v go >/dev/null || { echo "setup: Go is required (to build etcd and kube-apiserver); install Go >= 1.26" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: Rust is required (rustup, stable >= 1.95)" >&2; exit 1; }
installed_components="$(rustup component list --installed 2>/dev/null || true)"
for c in rustfmt clippy; do
  [[ "$installed_components" == *"$c"* ]] || rustup component add "$c"
done

# etcd, kube-apiserver and kubectl at pinned versions, built once into the cache.
"$(dirname "$0")/build-control-plane.sh"
