#!/bin/sh
# System packages needed to build crop_rs (Debian/Ubuntu):
#   cmake + nasm: turbojpeg-sys builds its bundled libjpeg-turbo 3.x with SIMD
#   (the same major version Pillow bundles, which the pixel tests rely on);
#   a C compiler for that build and for crop_rs/csrc/jpeg_shim.c.
# Run as root (CI images) or with sudo: sh crop_rs/scripts/install_build_deps.sh
set -eu
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends cmake nasm gcc make libc6-dev
