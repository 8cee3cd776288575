# One image for the dispatcher, the workers, the metrics exporter, rq-dashboard and the demo.
# torch comes first so that the project's torch>=2.1 is already satisfied; pass
# --build-arg TORCH="torch==2.13.0 --index-url <a CPU wheel index>" for a small CPU-only image.
FROM python:3.11-slim
ARG TORCH="torch>=2.1"
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install $TORCH
COPY pyproject.toml README.md ./
COPY producers producers
COPY shared shared
COPY workers workers
RUN pip install '.[mlflow]' rq-dashboard six && useradd --create-home trainbus && mkdir -p /data && chown trainbus /data
USER trainbus
CMD ["trainbus", "--help"]
