#!/usr/bin/env bash
# Starts a 3-node Shoal cluster on loopback (debug build), runs
# `examples/cluster_client.rs` against it, and stops the nodes. Used by
# `make test`; the cargo wrapper and features are the Makefile's.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO="${CARGO:-scripts/cargo.sh}"
FEATURES="${FEATURES:-}"
$CARGO build $FEATURES --bin shoal --example cluster_client
TARGET="${CARGO_TARGET_DIR:-target}"
SHOAL="$TARGET/debug/shoal"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Three loopback UDP ports from a random base (bash only: a fresh machine
# has no python).
BASE=$((20000 + RANDOM % 20000))
PORTS=("$BASE" "$((BASE + 1))" "$((BASE + 2))")
PEERS="1=127.0.0.1:${PORTS[0]},2=127.0.0.1:${PORTS[1]},3=127.0.0.1:${PORTS[2]}"
"$SHOAL" certs init --out "$WORK/tls" --nodes 1,2,3 >/dev/null
for i in 1 2 3; do
  "$SHOAL" node --id "$i" --data "$WORK/data$i" --listen "127.0.0.1:${PORTS[$((i-1))]}" \
    --peers "$PEERS" --tls "$WORK/tls" >"$WORK/node$i.log" 2>&1 &
  PIDS+=($!)
done
SHOAL_CLUSTER="$PEERS" SHOAL_TLS="$WORK/tls" "$TARGET/debug/examples/cluster_client"
