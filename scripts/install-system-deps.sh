#!/usr/bin/env bash
# System packages beyond Rust and Python, installed only when missing.
#   Build (always): cmake and nasm build the bundled libjpeg-turbo (see
#   crop_rs/scripts/install_build_deps.sh), a C compiler its C parts.
#   --test: Debian's chromium too, which the report tests render pages with.
set -euo pipefail
here="$(dirname "$0")"
if ! { command -v cmake && command -v nasm && command -v cc; } >/dev/null; then
    sh "$here/../crop_rs/scripts/install_build_deps.sh"
fi
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends chromium
fi
