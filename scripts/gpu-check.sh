#!/usr/bin/env bash
# One command for a machine with CUDA: the GPU tests, then ClassifyImages through a
# real server on the GPU in exact and fast precision (points/s, GPU utilisation).
# Runs in well under 8 minutes on an H100/H200. Where Rust is missing, install a
# prebuilt wheel of this package first (WHEEL=path/to/spacer_server-*.whl).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${WHEEL:-}" ]; then
    $PYTHON -m pip install -q --no-deps "$WHEEL"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PYTHON -c 'import torch; assert torch.cuda.is_available(), "CUDA is not available"'
timeout 240 $PYTHON -m pytest -q -m gpu -p no:cacheprovider tests/ || echo "gpu tests failed (exit $?)"
# GPU utilisation sampled every 200 ms while the benchmark runs.
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
    > "${OUT:-/tmp}/gpu-util.csv" &
sampler=$!
trap 'kill $sampler 2>/dev/null || true' EXIT
for precision in exact fast; do
    echo "== ClassifyImages on cuda, precision $precision"
    timeout 150 $PYTHON benchmarks/bench_server.py --device cuda --precision "$precision" \
        --images 64 --pyspacer-images 2 --clients 1,8 || echo "benchmark ($precision) failed"
done
kill $sampler 2>/dev/null || true
awk -F', ' '{ if ($1 > 0) { n++; s += $1 } } END { if (n) printf "GPU utilisation while busy: mean %.0f%% over %d samples\n", s / n, n }' \
    "${OUT:-/tmp}/gpu-util.csv"
