#!/usr/bin/env bash
# `make setup`: installs what the build and the tests need, skipping what is already there.
# Safe to run again; CI runs it on every fresh machine.
set -euo pipefail

# Debian packages. openssl makes the test control plane's keys and certificates; iproute2 the
# kernel tests' network namespaces and the test node's bridge; llvm-22-dev is what bpf-linker is
# built against (LLVM 22 is rustc 1.95's; bookworm-security has it). The test node runs Debian's
# containerd and runc, the CNI plugins (bridge, host-local, loopback) and iptables (kube-proxy);
# its pods run busybox-static, its sandboxes a pause built with gcc (`make images`). bpftool is
# how the kernel tests (and a user) see which programs a cgroup runs. python3-aiosmtpd is the SMTP
# relay the email notifier is tested against (tests/smtp/relay.py).
apt_packages=(openssl ca-certificates iproute2 llvm-22-dev containerd runc containernetworking-plugins iptables
  busybox-static gcc libc6-dev python3 python3-aiosmtpd bpftool)
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
# Headless Chromium loads the run pages in the real-node test, as a user's browser does.
# Without its recommends (they bring systemd, avahi and a desktop's worth of packages).
if ! command -v chromium >/dev/null; then
  echo "setup: installing chromium (headless, for the run pages' browser test)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium
fi

# Toolchains that come with the machine: check, with a clear message if absent.
command -v go >/dev/null || { echo "setup: Go is required (to build etcd and kube-apiserver); install Go >= 1.26" >&2; exit 1; }
command -v cargo >/dev/null || { echo "setup: Rust is required (rustup, stable >= 1.95)" >&2; exit 1; }
installed_components="$(rustup component list --installed 2>/dev/null || true)"
# rust-src: the kernel programs build core for bpfel-unknown-none (-Z build-std=core).
for c in rustfmt clippy rust-src; do
  [[ "$installed_components" == *"$c"* ]] || rustup component add "$c"
done

# bpf-linker links the kernel programs (node-agent/build.rs finds it here).
bpf_linker_version=0.13.0
tools="${RUNWARDEN_CACHE:-$HOME/.cache/runwarden}/tools"
have="$("$tools/bin/bpf-linker" --version 2>/dev/null || true)"
if [[ "$have" != "bpf-linker $bpf_linker_version" ]]; then
  echo "setup: building bpf-linker $bpf_linker_version against LLVM 22"
  PATH="/usr/lib/llvm-22/bin:$PATH" LLVM_PREFIX=/usr/lib/llvm-22 \
    cargo install --quiet --locked --root "$tools" "bpf-linker@$bpf_linker_version" --no-default-features --features llvm-22
fi

# etcd, kube-apiserver and kubectl at pinned versions, built once into the cache.
"$(dirname "$0")/build-control-plane.sh"
