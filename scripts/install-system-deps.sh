#!/usr/bin/env bash
# System packages beyond Rust and Python, installed only when missing
# (Debian/Ubuntu apt-get; run as root, or with sudo, which it calls itself).
#   Build (always): cmake and nasm build the bundled libjpeg-turbo (see
#   crop_rs/scripts/install_build_deps.sh), a C compiler its C parts.
#   --test: Debian's chromium too, which the report tests render pages with.
set -euo pipefail
here="$(dirname "$0")"
if { command -v cmake && command -v nasm && command -v cc; } >/dev/null; then
    echo "build tools present: cmake, nasm, cc"
else
    echo "installing the build tools cmake, nasm and a C compiler with apt-get"
    sh "$here/../crop_rs/scripts/install_build_deps.sh"
fi
if [ "${1:-}" = "--test" ]; then
    if command -v chromium >/dev/null; then
        echo "chromium present (report tests)"
    else
        echo "installing chromium (report tests) with apt-get"
        SUDO=""
        if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update
        $SUDO apt-get install -y --no-install-recommends chromium
    fi
fi
