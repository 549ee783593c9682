# Shoal's entry points. `make demo` and `make test` install what is missing
# first (scripts/setup.sh), then build through scripts/cargo.sh (ccache).
# The `shoal` binary, its tool modules and most of the root package's tests
# need the root package's `cli` feature (off for programs linking Shoal), so
# every target here turns it on; `lint` also checks the library without it.

CARGO := scripts/cargo.sh

.PHONY: all setup build demo demo-engine lint test test-long bench clippy fmt clean

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --features cli --bin shoal

## demo: the main job — the 3-node cluster demo, see README.md.
demo: setup
	$(CARGO) run --release --features cli --bin shoal -- demo --dir ./demo-data

## demo-engine: the engine crash demo.
demo-engine: setup
	$(CARGO) run --release --features cli --bin shoal -- demo --engine --dir ./demo-data

## lint: what reviews would otherwise catch: formatting (rustfmt) and every
## clippy and compiler warning, as errors; with every feature, and the root
## package once more without `cli` (what a program linking Shoal builds).
lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy -p shoal --all-targets --no-default-features -- -D warnings

## test: the lint checks, then every test of every crate (what CI runs);
## benchmarks are compiled, not run (`make bench` runs them); then the
## examples: embedded.rs, and cluster_client.rs against a 3-node cluster.
test: setup lint
	$(CARGO) test --workspace --all-features --tests
	$(CARGO) test --workspace --all-features --doc
	$(CARGO) test --workspace --all-features --benches --no-run
	$(CARGO) run --example embedded
	CARGO=$(CARGO) FEATURES="--features cli" scripts/cluster-example.sh

## test-long: soak mode — 100,000 simulator seeds, more crash rounds.
test-long: setup
	SHOAL_SIM_SEEDS=100000 SHOAL_CRASH_ROUNDS=200 SHOAL_MOVE_ROUNDS=200 $(CARGO) test --release --workspace --all-features

bench: setup
	$(CARGO) bench --workspace --all-features

clippy: setup
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings
	$(CARGO) clippy -p shoal --all-targets --no-default-features -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf demo-data
