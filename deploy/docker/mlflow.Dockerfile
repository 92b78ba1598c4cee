# MLflow tracking server with the PostgreSQL driver (the coordinator is its only client).
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
RUN pip install mlflow==3.17.2 psycopg2-binary \
    && useradd --uid 10002 --create-home mlflow && mkdir -p /mlartifacts && chown mlflow /mlartifacts
USER mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
