# Tuneforge server image, on NVIDIA's CUDA 13.0 runtime: the CUDA that torch 2.11's default wheels are built for
# (torch.version.cuda == "13.0"). The host needs only NVIDIA's driver and container toolkit (`--gpus all`, or the
# Kubernetes device plugin); without a GPU the same image trains on the CPU.
#
# Build:  docker build -t tuneforge .
# Run:    docker run --gpus all -p 50051:50051 -p 9464:9464 -v tuneforge-data:/data -v /srv/models:/models:ro tuneforge
# gRPC on 50051, Prometheus /metrics on 9464, health via `tuneforge health`. Logs are JSON lines on stderr.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---- build stage: a virtual environment with the server and ray extras (compilers and pip stay behind)
FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's Python is patched by the distribution's security updates; its version is not pinned here on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/tuneforge
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY workers ./workers
COPY clients ./clients
RUN /opt/tuneforge/bin/pip install '.[server,ray]'

# ---- runtime stage: Python, the environment, a non-root user and the data volume
FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="tuneforge" \
      org.opencontainers.image.description="gRPC model-adaptation service"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tuneforge \
    && useradd --system --uid 10001 --gid tuneforge --home-dir /data --shell /usr/sbin/nologin tuneforge \
    && mkdir -p /data /models \
    && chown tuneforge:tuneforge /data
COPY --from=build /opt/tuneforge /opt/tuneforge
ENV PATH=/opt/tuneforge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051 9464
# The gRPC health service says SERVING once every worker is ready; `tuneforge health` exits 0 only then. With TLS,
# set TUNEFORGE_TLS_CA (and TUNEFORGE_TLS_CERT/KEY for mutual TLS): every `tuneforge` command, this check included,
# reads them; the server's certificate must then name 127.0.0.1 or localhost.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["tuneforge", "--server", "127.0.0.1:50051", "--timeout", "5", "health"]
# Inside a container the server must listen on all interfaces; publish the ports only where callers should reach them.
ENTRYPOINT ["tuneforge", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", \
            "--data-dir", "/data", "--model-root", "/models"]
# Off loopback the server refuses plaintext unless asked: serve TLS with `--tls-cert /certs/tls.crt --tls-key
# /certs/tls.key` (add `--tls-client-ca` for mutual TLS) or, where a proxy or mesh terminates TLS, keep
# --allow-plaintext. `--access-file` turns on bearer-token authentication and tenant quotas.
CMD ["--workers", "1", "--log-format", "json", "--allow-plaintext"]
