# syntax=docker/dockerfile:1
# segassist images. Two targets share one base:
#   api    — FastAPI + ONNX Runtime, no torch      docker build --target api -t segassist-api .
#   worker — Celery worker with torch (CPU build)  docker build --target worker -t segassist-worker .
# GPU variant (CUDA torch + onnxruntime-gpu):      docker build --target worker --build-arg VARIANT=gpu .

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SEGASSIST_DATA_DIR=/data
RUN groupadd --system --gid 10001 segassist \
    && useradd --system --uid 10001 --gid segassist --home-dir /app --shell /usr/sbin/nologin segassist \
    && mkdir -p /data \
    && chown segassist:segassist /data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY server ./server
COPY worker ./worker
COPY client ./client
# the segassist namespace: links to the four folders above (segassist.server → server/, …)
COPY segassist ./segassist

# --- api: the REST service; predictions through ONNX Runtime (CPU, or GPU with VARIANT=gpu) ---
FROM base AS api
ARG VARIANT=cpu
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
RUN pip install --no-cache-dir "/app[server]" \
    && if [ "${VARIANT}" = "gpu" ]; then \
         pip uninstall --yes onnxruntime \
         && pip install --no-cache-dir "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
       fi
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/api/v1/health', timeout=4).status == 200 else 1)"]
CMD ["uvicorn", "segassist.server.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: pretraining, few-shot fitting, ONNX export (torch) ---
FROM base AS worker
ARG VARIANT=cpu
ARG ONNXRUNTIME_GPU_VERSION=1.31.1
# torch is pinned; the CPU variant takes the CPU-only wheel (no multi-GB CUDA libraries), the GPU
# variant the default CUDA wheel, then onnxruntime-gpu in place of onnxruntime (the two packages
# share one module folder: onnxruntime is removed first, never after).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN if [ "${VARIANT}" = "gpu" ]; then \
         pip install --no-cache-dir "torch==2.13.0" \
         && pip install --no-cache-dir "/app[worker]" \
         && pip uninstall --yes onnxruntime \
         && pip install --no-cache-dir "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"; \
       else \
         pip install --no-cache-dir --extra-index-url "${TORCH_CPU_INDEX}" "torch==2.13.0" \
         && pip install --no-cache-dir "/app[worker]"; \
       fi
USER 10001:10001
CMD ["segassist", "worker"]
