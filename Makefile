# One entry point for people, README and CI.
#
#   make setup               install what is needed (idempotent)
#   make test                setup, images, then lint and every test (unit, property, control plane, real node)
#   make demo                runwarden on a real single-node cluster here, then a short story; stays up
#   make demo-down           stop the demo cluster and remove what it put on this machine
#   make images              the agent's and operator's container images (and the test node's) as OCI archives
#   make generate            regenerate committed files (crds/*.yaml, operator/rbac.yaml, node-agent/rbac.yaml and their
#                            copies in charts/runwarden/templates) from the Rust code
#   make bench               benchmarks: detector, operator at scale, agent pipeline, kernel programs' cost, call storm,
#                            detection latency and agent memory on the real node (figures printed, nothing asserted;
#                            the agent's need root)
#   make replay              the detector on the public replay corpus, scored by its score.py
#   make heldout             the detector on a held-out replay (new history, attacks from public incident reports,
#                            detector/heldout/generate.py), scored the same way: a check not to tune against
#   make dev-control-plane   start etcd + kube-apiserver by hand, CRDs installed, kubeconfig written

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# Build output lives outside the repository so fresh clones (CI) reuse it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/runwarden/target
export RUNWARDEN_CACHE ?= $(HOME)/.cache/runwarden

.PHONY: setup images demo demo-down test lint generate dev-control-plane bench replay heldout

# The public replay corpus, beside the repository.
CORPUS ?= ../shared/datasets/egress-replay

setup:
	hack/setup.sh

images: setup
	hack/images.sh

demo: setup images
	hack/demo.sh

demo-down:
	hack/demo.sh down

test: setup lint images
	cargo test --workspace --locked

lint:
	cargo fmt --all -- --check
	cargo fmt --manifest-path node-agent-ebpf/programs/Cargo.toml -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cd node-agent-ebpf/programs && PATH="$(RUNWARDEN_CACHE)/tools/bin:$$PATH" RUSTC_BOOTSTRAP=1 \
	  cargo clippy --locked --release --target bpfel-unknown-none -Z build-std=core \
	  --target-dir $(CARGO_TARGET_DIR)/bpf -- -D warnings

generate:
	cargo run --locked -q -p runwarden-crds --bin runwarden-crdgen
	cargo run --locked -q -p runwarden-operator -- --print-rbac runwarden-system > operator/rbac.yaml
	cargo run --locked -q -p runwarden-agent -- --print-rbac runwarden-system > node-agent/rbac.yaml
	cargo run --locked -q -p runwarden-operator -- --print-rbac-chart > charts/runwarden/templates/operator-rbac.yaml
	cargo run --locked -q -p runwarden-agent -- --print-rbac-chart > charts/runwarden/templates/agent-rbac.yaml
	cargo run --locked -q -p runwarden-tests --bin runwarden-docs

dev-control-plane: setup
	cargo run --locked -q -p runwarden-tests --bin runwarden-control-plane

bench: setup images
	cargo bench --locked -p runwarden-detector
	cargo bench --locked -p runwarden-operator --bench scale
	cargo bench --locked -p runwarden-operator --bench ui
	cargo bench --locked -p runwarden-agent --bench pipeline
	cargo bench --locked -p runwarden-agent --bench connect
	cargo bench --locked -p runwarden-agent --bench block
	cargo bench --locked -p runwarden-agent --bench storm
	cargo bench --locked -p runwarden-tests --bench latency
	cargo bench --locked -p runwarden-tests --bench memory

replay:
	cargo build --locked --release -q -p runwarden-detector --bin runwarden-replay
	$(CARGO_TARGET_DIR)/release/runwarden-replay --input $(CORPUS)/runs.jsonl --output $(CARGO_TARGET_DIR)/alerts.jsonl
	python3 $(CORPUS)/score.py --traces $(CORPUS) --alerts $(CARGO_TARGET_DIR)/alerts.jsonl

HELDOUT := $(CARGO_TARGET_DIR)/heldout
heldout:
	cargo build --locked --release -q -p runwarden-detector --bin runwarden-replay
	python3 detector/heldout/generate.py --jobs $(CORPUS)/jobs.jsonl --out $(HELDOUT)
	$(CARGO_TARGET_DIR)/release/runwarden-replay --input $(HELDOUT)/runs.jsonl --output $(HELDOUT)/alerts.jsonl
	python3 $(CORPUS)/score.py --traces $(HELDOUT) --alerts $(HELDOUT)/alerts.jsonl
