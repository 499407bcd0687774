#!/usr/bin/env bash
# System packages the build needs beyond Rust and Python (none yet).
set -euo pipefail
