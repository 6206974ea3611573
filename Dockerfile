# Tuneforge server image. The torch wheels bring their own CUDA 13 runtime libraries, so the image needs only the
# host's NVIDIA driver (NVIDIA Container Toolkit, `--gpus all`); on a machine without a GPU it trains on the CPU.
# Build: docker build -t tuneforge .   Run: docker run -p 50051:50051 -v tuneforge-data:/data tuneforge

# ---- build stage: a virtual environment with the server extra
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/tuneforge
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY workers ./workers
COPY clients ./clients
RUN /opt/tuneforge/bin/pip install '.[server]'

# ---- runtime stage: the environment, a non-root user and the data volume
FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="tuneforge" \
      org.opencontainers.image.description="gRPC model-adaptation service"
RUN groupadd --system --gid 10001 tuneforge \
    && useradd --system --uid 10001 --gid tuneforge --home-dir /data --shell /usr/sbin/nologin tuneforge \
    && mkdir -p /data /models \
    && chown tuneforge:tuneforge /data
COPY --from=build /opt/tuneforge /opt/tuneforge
ENV PATH=/opt/tuneforge/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf-cache
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051
# Inside a container the server must listen on all interfaces; publish the port only where callers should reach it.
ENTRYPOINT ["tuneforge", "serve", "--host", "0.0.0.0", "--port", "50051", "--data-dir", "/data", "--model-root", "/models"]
CMD ["--workers", "1"]
