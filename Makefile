# One entry point for people, README and CI.
#
#   make setup               install what is needed (idempotent)
#   make test                setup, then lint and every test (unit, property, control plane)
#   make generate            regenerate committed files (crds/*.yaml) from the Rust types
#   make dev-control-plane   start etcd + kube-apiserver by hand, CRDs installed, kubeconfig written

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Build output lives outside the repository so fresh clones (CI) reuse it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/runwarden/target
export RUNWARDEN_CACHE ?= $(HOME)/.cache/runwarden

.PHONY: setup test lint generate dev-control-plane

setup:
	hack/setup.sh

test: setup lint
	cargo test --workspace --locked

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

generate:
	cargo run --locked -q -p runwarden-crds --bin runwarden-crdgen

dev-control-plane: setup
	cargo run --locked -q -p runwarden-tests --bin runwarden-control-plane
