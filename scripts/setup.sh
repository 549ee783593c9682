#!/usr/bin/env bash
# Installs what building Shoal needs beyond Rust and gcc, if it is missing:
# clang + libclang-dev (bindgen for the rocksdb crate) and ccache (so the
# RocksDB C++ build is compiled once per machine, not once per target dir).
set -euo pipefail

have_libclang() {
    ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
    compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null && return 0
    compgen -G '/usr/lib/x86_64-linux-gnu/libclang*.so*' >/dev/null && return 0
    return 1
}

missing=()
have_libclang || missing+=(clang libclang-dev)
command -v ccache >/dev/null 2>&1 || missing+=(ccache)
command -v g++ >/dev/null 2>&1 || missing+=(g++)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "setup: installing ${missing[*]}" >&2
if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "setup: missing packages and not root. Run this, then try again:" >&2
    echo "    sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
