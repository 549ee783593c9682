#!/usr/bin/env bash
# Runs cargo with the build cache settings Shoal relies on: ccache in front of
# the C/C++ compilers (the cc crate honours CC/CXX), its cache outside the
# work tree so every clone and target dir shares it.
set -euo pipefail
export CCACHE_DIR="${CCACHE_DIR:-/var/tmp/shoal-ccache}"
if command -v ccache >/dev/null 2>&1; then
    export CC="${CC:-ccache gcc}" CXX="${CXX:-ccache g++}"
fi
exec cargo "$@"
