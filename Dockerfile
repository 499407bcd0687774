# Two stages: build the abi3 wheel with Rust, then install it on a slim Python.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl build-essential cmake nasm \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH="/root/.cargo/bin:${PATH}"
RUN pip install --no-cache-dir "maturin>=1.7,<2"
WORKDIR /src
COPY . .
RUN maturin build --release --out /wheels

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV SPACER_EXTRACTORS_CACHE_DIR=/cache
VOLUME ["/cache"]
EXPOSE 50051
# Listen on all interfaces inside the container; publish the port to choose exposure.
CMD ["spacer", "serve", "--address", "0.0.0.0:50051"]
