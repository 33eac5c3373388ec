#!/usr/bin/env bash
# Installs the system packages the workspace needs to build, if missing:
# cmake, a C++ compiler and libclang (bindgen) build HiGHS, the MILP solver of
# moe-place (good_lp). Uses the system's package manager (apt-get, dnf, zypper,
# pacman or brew), through sudo when not root. Does nothing when all are present.
set -euo pipefail

have_libclang() {
    # bindgen (clang-sys) finds libclang through LIBCLANG_PATH, or in the usual places
    local pattern
    # (libclang.so or libclang-N.so, not libclang-cpp)
    for pattern in "${LIBCLANG_PATH:-/nonexistent}"/libclang{.,-[0-9]}*so* /usr/lib/llvm-*/lib/libclang{.,-[0-9]}*so* \
        /usr/lib64/libclang{.,-[0-9]}*so* /usr/lib/libclang{.,-[0-9]}*so* /usr/lib/*-linux-gnu/libclang{.,-[0-9]}*so* \
        /opt/homebrew/opt/llvm/lib/libclang.dylib /usr/local/opt/llvm/lib/libclang.dylib; do
        [[ -e "$pattern" ]] && return 0
    done
    return 1
}

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || missing+=(c++)
have_libclang || missing+=(libclang)
if [[ ${#missing[@]} -eq 0 ]]; then
    exit 0
fi
echo "installing what the build needs and this machine lacks: ${missing[*]}" >&2

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
        echo "error: ${missing[*]} missing, not root and no sudo; install cmake, g++ and libclang yourself" >&2
        exit 1
    fi
fi

if command -v apt-get >/dev/null 2>&1; then
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends cmake g++ libclang-dev
elif command -v dnf >/dev/null 2>&1; then
    "${SUDO[@]}" dnf install -y cmake gcc-c++ clang-devel
elif command -v zypper >/dev/null 2>&1; then
    "${SUDO[@]}" zypper --non-interactive install cmake gcc-c++ clang-devel
elif command -v pacman >/dev/null 2>&1; then
    "${SUDO[@]}" pacman -S --noconfirm --needed cmake gcc clang
elif command -v brew >/dev/null 2>&1; then
    brew install cmake llvm
else
    echo "error: no known package manager; install cmake, a C++ compiler and libclang, then rerun" >&2
    exit 1
fi
