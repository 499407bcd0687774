# syntax=docker/dockerfile:1
# Two stages: build the abi3 wheel with Rust, then install it on a slim Python
# that runs `spacer serve` as a non-root user. See docs/deploy.md.
#
#   docker build -t spacer .                                  # CPU
#   docker build -t spacer:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
#
# The CUDA variant only swaps the PyTorch wheels: they bring their own CUDA
# libraries, the host's driver comes in through the NVIDIA container toolkit.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions of the build tools come with the base image's Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates build-essential cmake nasm \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH="/root/.cargo/bin:${PATH}"
RUN pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
# .dockerignore keeps target/, .git and test data out of this copy.
COPY . .
RUN maturin build --release --out /wheels

FROM ${PYTHON_IMAGE} AS runtime
# cpu: small CPU-only PyTorch wheels; a CUDA index (or https://pypi.org/simple) for GPUs.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY --from=build /wheels /wheels
# The versions the tests passed with (constraints.txt); a CPU wheel's "+cpu" matches its pin.
COPY constraints.txt /wheels/
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -c /wheels/constraints.txt /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home spacer \
    && mkdir -p /data /cache \
    && chown spacer:spacer /data /cache
# Filesystem DataLocations are confined to /data; extractor weights are cached in /cache.
ENV SPACER_HOST=0.0.0.0 \
    SPACER_PORT=50051 \
    SPACER_METRICS_PORT=9464 \
    SPACER_DATA_ROOTS=/data \
    SPACER_EXTRACTORS_CACHE_DIR=/cache \
    SPACER_GRACE_SECONDS=30 \
    PYTHONUNBUFFERED=1
VOLUME ["/data", "/cache"]
WORKDIR /data
USER 10001:10001
EXPOSE 50051 9464
# gRPC health, not a TCP probe: SERVING only once the server is up and not draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["spacer", "health", "127.0.0.1:50051", "--timeout", "4"]
# The server drains on SIGTERM for SPACER_GRACE_SECONDS: stop with a longer timeout
# (docker stop -t 40, or terminationGracePeriodSeconds in Kubernetes).
STOPSIGNAL SIGTERM
CMD ["spacer", "serve"]
