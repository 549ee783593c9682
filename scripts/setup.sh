#!/usr/bin/env bash
# Installs what building Shoal needs beyond Rust and gcc, if it is missing:
# clang + libclang-dev (bindgen for the rocksdb crate loads libclang at build
# time), g++ (RocksDB is C++) and ccache (so the RocksDB C++ build is compiled
# once per machine, not once per target dir); and the rustup components
# clippy and rustfmt (`make test` checks formatting and lints).
#
# What is installed is asked of the package manager, never guessed from file
# globs: a Debian machine often has `libclang-cpp14` (the C++ interface
# library, pulled in by other packages) without `libclang`, and a glob like
# `libclang*.so*` mistakes the one for the other.
#
# `SHOAL_SETUP_FUNCTIONS_ONLY=1 source scripts/setup.sh` defines the functions
# and does nothing else (tests/setup_script.rs uses it).
set -euo pipefail

# Succeeds when the Debian package $1 is installed (dpkg's "install ok
# installed"; a package that was removed but not purged does not count).
package_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [ "$status" = "install ok installed" ]
}

# Succeeds when directory $1 holds a libclang that bindgen (clang-sys) can
# load: `libclang.so`, `libclang-<ver>.so`, `libclang.so.<N>` or
# `libclang-<ver>.so.<N>` - the names clang-sys searches for. `libclang-cpp*`
# is a different library (clang's C++ API) and does not count.
libclang_in_dir() {
    local dir=$1 file name
    [ -d "$dir" ] || return 1
    for file in "$dir"/libclang*.so*; do
        [ -e "$file" ] || continue
        name=${file##*/}
        if [[ $name =~ ^libclang(-[0-9][0-9.]*)?\.so(\.[0-9][0-9.]*)?$ ]]; then
            return 0
        fi
    done
    return 1
}

# The packages still to install, space-separated, for this machine.
# With LIBCLANG_PATH set (the user points bindgen at a libclang of their own),
# that directory is checked instead of the clang packages.
missing_packages() {
    local missing=()
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        libclang_in_dir "$LIBCLANG_PATH" || missing+=(clang libclang-dev)
    else
        package_installed libclang-dev || missing+=(libclang-dev)
        package_installed clang || missing+=(clang)
    fi
    command -v g++ >/dev/null 2>&1 || missing+=(g++)
    command -v ccache >/dev/null 2>&1 || missing+=(ccache)
    echo "${missing[*]}"
}

# The rustup components `make test` needs that are not installed, space-
# separated. Without rustup (a distribution's Rust) nothing can be added
# this way; `cargo clippy` / `cargo fmt` then report what is missing.
missing_rust_components() {
    local installed missing=() component
    command -v rustup >/dev/null 2>&1 || return 0
    installed=$(rustup component list --installed 2>/dev/null) || return 0
    for component in clippy rustfmt; do
        # Installed components are listed as <name>-<target triple>.
        grep -q "^${component}-" <<<"$installed" || missing+=("$component")
    done
    echo "${missing[*]}"
}

install_packages() {
    echo "setup: installing $*" >&2
    if [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "$@" >/dev/null
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: missing packages and not root. Run this, then try again:" >&2
        echo "    sudo apt-get install -y $*" >&2
        exit 1
    fi
}

main() {
    local components
    components=$(missing_rust_components)
    if [ -n "$components" ]; then
        echo "setup: adding rustup components $components" >&2
        # shellcheck disable=SC2086 # word splitting is the point
        rustup component add $components
    fi
    if ! command -v dpkg-query >/dev/null 2>&1; then
        echo "setup: not a Debian/Ubuntu machine; install clang, libclang (dev), g++ and ccache" >&2
        echo "setup: with your package manager (or set LIBCLANG_PATH), then run make again." >&2
        return 0
    fi
    local missing
    missing=$(missing_packages)
    [ -z "$missing" ] && return 0
    # shellcheck disable=SC2086 # word splitting is the point
    install_packages $missing
    missing=$(missing_packages)
    if [ -n "$missing" ]; then
        echo "setup: still missing after the install: $missing" >&2
        exit 1
    fi
}

if [ "${SHOAL_SETUP_FUNCTIONS_ONLY:-0}" != 1 ]; then
    main
fi
