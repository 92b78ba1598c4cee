# Site image: Flower SuperNode + the MedFed ClientApp (`medfed site`). Outbound connections
# only: nothing listens outside the container (the runtime API is bound to 127.0.0.1).
#   docker build -f deploy/docker/site.Dockerfile -t medfed-site .                          # CPU
#   docker build -f deploy/docker/site.Dockerfile --build-arg VARIANT=cuda -t medfed-site:cuda .
ARG PYTHON=3.11
FROM python:${PYTHON}-slim
ARG VARIANT=cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client client
COPY server server
COPY strategies strategies
COPY protocol protocol
COPY models models
COPY medfed medfed
COPY conf conf
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
# /data: the hospital's DICOM export (read-only is enough); /state: Flower home and the
# privacy ledger; /certs: ca.pem and this site's auth.key.
VOLUME ["/state"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9094/health', timeout=4)"]
ENTRYPOINT ["medfed", "site"]
CMD ["--help"]
