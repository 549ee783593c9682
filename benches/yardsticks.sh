#!/usr/bin/env bash
# Disk yardsticks for the engine benchmarks: RocksDB's own db_bench doing
# synced random fills (Debian's rocksdb-tools), on the same disk as the
# benches (TMPDIR). The raw fdatasync and sequential-write yardsticks are
# measured inside `cargo bench -p shoal-engine` itself.
set -euo pipefail
if ! command -v rocksdb_db_bench >/dev/null 2>&1 && ! command -v db_bench >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq rocksdb-tools >/dev/null; else echo "install rocksdb-tools first" >&2; exit 1; fi
fi
bench=$(command -v rocksdb_db_bench || command -v db_bench)
dir=$(mktemp -d "${TMPDIR:-/tmp}/shoal-dbbench.XXXXXX")
trap 'rm -rf "$dir"' EXIT
"$bench" --benchmarks=fillrandom --sync=1 --num=20000 --value_size=256 --key_size=16 --threads=1 --db="$dir" 2>&1 | grep -E '^fillrandom'
