#!/usr/bin/env bash
# `make images`: builds the container images as OCI archives into $RUNWARDEN_CACHE/images/, from
# the Containerfiles, with no daemon and no registry (hack/oci-image.py):
#   runwarden-agent.tar, runwarden-operator.tar   localhost/runwarden/runwarden-{agent,operator}:dev
#   test-busybox.tar, test-pause.tar              what the test node's pods and sandboxes run
# Import into containerd with `ctr -n k8s.io images import FILE` (the test node does).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${RUNWARDEN_CACHE:-$HOME/.cache/runwarden}"
target="${CARGO_TARGET_DIR:-$cache/target}"
out="$cache/images"
stage="$out/context"
tag="${RUNWARDEN_IMAGE_TAG:-dev}"
mkdir -p "$out"

# Static binaries: the images hold nothing else (no libc to ship, no base image to pin). With
# --target, RUSTFLAGS reach only the binaries, not build scripts or proc macros.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked -q \
  --target x86_64-unknown-linux-gnu -p runwarden-agent -p runwarden-operator

image() { # name containerfile tag
  "$(dirname "$0")/oci-image.py" --file "$2" --context "$stage/$1" --tag "$3" --out "$out/$1.tar"
}
for c in agent operator; do
  rm -rf "${stage:?}/runwarden-$c"
  mkdir -p "$stage/runwarden-$c"
  cp "$target/x86_64-unknown-linux-gnu/release/runwarden-$c" "$stage/runwarden-$c/"
done
# The CA certificates the operator's https notifiers trust (Debian's ca-certificates package).
cp /etc/ssl/certs/ca-certificates.crt "$stage/runwarden-operator/"
image runwarden-agent node-agent/Containerfile "localhost/runwarden/runwarden-agent:$tag"
image runwarden-operator operator/Containerfile "localhost/runwarden/runwarden-operator:$tag"

# Test images: static busybox (Debian's busybox-static) and a static pause.
rm -rf "$stage/test-busybox" "$stage/test-pause"
mkdir -p "$stage/test-busybox/rootfs/bin" "$stage/test-busybox/rootfs/etc" "$stage/test-busybox/rootfs/tmp" "$stage/test-pause"
cp /bin/busybox "$stage/test-busybox/rootfs/bin/busybox"
for applet in $(/bin/busybox --list); do
  [[ "$applet" == busybox ]] || ln -s busybox "$stage/test-busybox/rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$stage/test-busybox/rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\n' > "$stage/test-busybox/rootfs/etc/group"
gcc -static -Os -o "$stage/test-pause/pause" tests/images/pause/pause.c
image test-busybox tests/images/busybox/Containerfile localhost/runwarden/test-busybox:1
image test-pause tests/images/pause/Containerfile localhost/runwarden/test-pause:1
