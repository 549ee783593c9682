# Shoal's entry points. `make demo` and `make test` install what is missing
# first (scripts/setup.sh), then build through scripts/cargo.sh (ccache).

CARGO := scripts/cargo.sh

.PHONY: all setup build demo demo-engine lint test test-long bench clippy fmt clean

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release --bin shoal

## demo: the main job — the 3-node cluster demo, see README.md.
demo: setup
	$(CARGO) run --release --bin shoal -- demo --dir ./demo-data

## demo-engine: the engine crash demo.
demo-engine: setup
	$(CARGO) run --release --bin shoal -- demo --engine --dir ./demo-data

## lint: what reviews would otherwise catch: formatting (rustfmt) and every
## clippy and compiler warning, as errors.
lint: setup
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: the lint checks, then every test of every crate (what CI runs);
## benchmarks are compiled, not run (`make bench` runs them).
test: setup lint
	$(CARGO) test --workspace --tests
	$(CARGO) test --workspace --doc
	$(CARGO) test --workspace --benches --no-run

## test-long: soak mode — 100,000 simulator seeds, more crash rounds.
test-long: setup
	SHOAL_SIM_SEEDS=100000 SHOAL_CRASH_ROUNDS=200 SHOAL_MOVE_ROUNDS=200 $(CARGO) test --release --workspace

bench: setup
	$(CARGO) bench --workspace

clippy: setup
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf demo-data
