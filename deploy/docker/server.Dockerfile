# Coordinator image: Flower SuperLink + the MedFed ServerApp (`medfed server`, `medfed run`).
# Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t medfed-server .                      # CPU
#   docker build -f deploy/docker/server.Dockerfile --build-arg VARIANT=cuda -t medfed-server:cuda .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim
ARG VARIANT=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client client
COPY server server
COPY strategies strategies
COPY protocol protocol
COPY models models
COPY medfed medfed
COPY conf conf
# torch first (CPU wheel index, or the default CUDA build), then everything else pinned by
# constraints.txt; for CUDA its CPU torch pin is dropped. Editable install: `medfed run`
# submits /app (pyproject.toml [tool.flwr.app]) as the Flower app.
RUN set -eux; \
    if [ "$VARIANT" = "cuda" ]; then \
        pip install torch==2.13.0; grep -v '^torch==' constraints.txt > /tmp/constraints.txt; \
    elif [ "$VARIANT" = "cpu" ]; then \
        pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
        cp constraints.txt /tmp/constraints.txt; \
    else echo "VARIANT must be cpu or cuda" >&2; exit 1; fi; \
    pip install -c /tmp/constraints.txt -e .
RUN useradd --uid 10001 --create-home medfed && mkdir -p /state && chown medfed /state
USER medfed
# One port: Flower's Fleet, Control and Runtime APIs over TLS.
EXPOSE 9093
VOLUME ["/state"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s \
    CMD ["medfed", "health", "--superlink", "127.0.0.1:9093", "--root-cert", "/certs/ca.pem"]
ENTRYPOINT ["medfed", "server"]
CMD ["--certs", "/certs", "--state-dir", "/state", "--host", "0.0.0.0", "--port", "9093"]
