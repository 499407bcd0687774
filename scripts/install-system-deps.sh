#!/usr/bin/env bash
# System packages the build needs beyond Rust and Python: cmake and nasm build
# the bundled libjpeg-turbo (see crop_rs/scripts/install_build_deps.sh).
set -euo pipefail
if command -v cmake >/dev/null && command -v nasm >/dev/null && command -v cc >/dev/null; then
    exit 0
fi
sh "$(dirname "$0")/../crop_rs/scripts/install_build_deps.sh"
