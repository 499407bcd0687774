#!/usr/bin/env bash
# Bounded mutation fuzzing of the image decoder; crash inputs are saved under
# tests/fixtures/crop_regressions/ and replayed by the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 crop_rs/fuzz/fuzz_decode.py --seconds "${FUZZ_SECONDS:-60}"
