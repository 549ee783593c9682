#!/usr/bin/env bash
# Runs cargo with the build cache settings Shoal relies on: ccache in front of
# the C/C++ compilers (the cc crate honours CC/CXX), its cache outside the
# work tree so every clone and target dir shares it.
#
# When a build fails because bindgen (the rocksdb crate's build script) could
# not load libclang, says which command installs it: setup.sh checks for it
# first, but a machine can still lack it (LIBCLANG_PATH pointing at the wrong
# place, a package removed since). Cargo's output streams as usual, and its
# exit code is this script's.
set -euo pipefail
export CCACHE_DIR="${CCACHE_DIR:-/var/tmp/shoal-ccache}"
if command -v ccache >/dev/null 2>&1; then
    export CC="${CC:-ccache gcc}" CXX="${CXX:-ccache g++}"
fi
# Cargo's stderr goes through tee below, so it is no longer a terminal:
# keep the colours a terminal would have had.
if [ -t 2 ]; then
    export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-always}"
fi

stderr_copy=$(mktemp "${TMPDIR:-/tmp}/shoal-cargo-stderr.XXXXXX")
trap 'rm -f "$stderr_copy"' EXIT

# stdout goes straight through (fd 3); stderr is copied to the file by tee.
exec 3>&1
set +e
cargo "$@" 2>&1 1>&3 3>&- | tee "$stderr_copy" >&2
status=${PIPESTATUS[0]}
set -e
if [ "$status" -ne 0 ] && grep -q "Unable to find libclang" "$stderr_copy"; then
    echo "" >&2
    echo "cargo.sh: the build needs libclang (bindgen could not load it); to install it," >&2
    echo "run: sudo apt-get install -y clang libclang-dev" >&2
fi
exit "$status"
