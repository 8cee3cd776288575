# Two images from one file (build one with --target: the legacy builder builds every stage
# before the one asked for, and without --target the last one).
#   worker: the dispatcher, the RQ workers, the metrics exporter and rq-dashboard.
#     The workers never import torch, so it is not installed: the project's dependencies but
#     torch come from pyproject.toml, then the project itself without dependencies.
#   demo (`--target demo`): the worker image plus torch, for `trainbus demo` and trainings in
#     the stack. --build-arg TORCH="torch==2.13.0 --index-url <a CPU wheel index>" for a small
#     CPU-only build (the default pulls the CUDA build, several GB).
FROM python:3.11-slim AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 RQ_WORKER_CLASS=workers.pipeline.rq_worker.SinkWorker \
    RQ_CONFIG=workers.pipeline.rq_settings
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(d for d in deps['dependencies'] + deps['optional-dependencies']['mlflow'] \
if not d.startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt rq-dashboard six && rm /tmp/requirements.txt
COPY producers producers
COPY shared shared
COPY workers workers
# /data and /clearml are volumes: made here, a new volume takes their owner (else root: the worker cannot write)
RUN pip install --no-deps . && useradd --create-home trainbus && mkdir -p /data /clearml && chown trainbus /data /clearml
USER trainbus
CMD ["trainbus", "--help"]

FROM worker AS demo
ARG TORCH="torch>=2.1"
USER root
RUN pip install $TORCH
USER trainbus
