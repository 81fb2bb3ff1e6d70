# syntax=docker/dockerfile:1
# promptserve: one frozen causal LM serving many prompt-learning tasks. CPU image by default;
# a CUDA image with:  docker build --build-arg TORCH_VARIANT=cu126 -t promptserve:cuda .
# (TORCH_VARIANT is a PyTorch wheel index: cpu, cu126, cu128, ... as listed on download.pytorch.org/whl/.)

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- builder: a self-contained virtual environment in /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements.lock pyproject.toml ./
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -c requirements.lock pip setuptools
# torch first and from its own index: the default PyPI wheel would pull a multi-GB CUDA build into a CPU image.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
# The runtime dependencies, the train extra (`promptserve train` on the image's GPU) and the s3 extra (a store on
# object storage: `--store s3://bucket/prefix`), without the dev extra, at the versions of the lock the suite passed
# with. (Ray Serve images add the ray extra on Ray's own base image: deploy/k8s/ray.)
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; e = p['optional-dependencies']; \
print(*p['dependencies'], *e['train'], *e['s3'], sep='\n')" > /tmp/runtime.txt \
    && pip install --no-cache-dir -c requirements.lock -r /tmp/runtime.txt
COPY README.md ./
COPY clients clients
COPY prompt_store prompt_store
COPY server server
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && pip check

# ---- gpu-check (docker build --target gpu-check): the builder's environment plus the dev extra, the tests and the
# benchmarks, from the lock, so `python -m benchmarks.gpu_check` runs on a GPU host with no network ----
FROM builder AS gpu-check
# the benchmarks' baselines are PEFT's generate, right on transformers 5.23.0 (Makefile: BENCH_TRANSFORMERS)
ARG BENCH_TRANSFORMERS=5.23.0
# Triton (torch.compile: attention_backend=flex, its GPU tests and the attention stage) builds its CUDA launcher with a
# C compiler at the first compiled call, against Python.h (the base image's); the slim base has no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY tests tests
COPY benchmarks benchmarks
# hadolint ignore=DL3013
RUN grep -v '^transformers==' requirements.lock > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt poetry-core \
    && pip install --no-cache-dir -c /tmp/constraints.txt --no-build-isolation ".[dev]" \
       "transformers==${BENCH_TRANSFORMERS}" \
    && pip check
CMD ["python", "-m", "benchmarks.gpu_check"]

# ---- runtime: the virtual environment, a non-root user, two volumes ----
FROM ${PYTHON_IMAGE} AS runtime
ARG PROMPTSERVE_UID=10001
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="promptserve" \
      org.opencontainers.image.description="One frozen causal LM serving many prompt-tuned tasks in one batch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid "${PROMPTSERVE_UID}" promptserve \
    && useradd --system --uid "${PROMPTSERVE_UID}" --gid "${PROMPTSERVE_UID}" --create-home \
       --home-dir /home/promptserve --shell /usr/sbin/nologin promptserve \
    && mkdir -p /data/store /data/hf \
    && chown -R "${PROMPTSERVE_UID}:${PROMPTSERVE_UID}" /data
# A CUDA image compiles with Triton where attention_backend=flex, which needs a C compiler (see gpu-check above).
# hadolint ignore=DL3008
RUN if [ "${TORCH_VARIANT}" != cpu ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=builder /opt/venv /opt/venv
# HF_HUB_OFFLINE=1 (set at run time) never touches the network: models must then already be in /data/hf
# or be a mounted directory. The built-in default model ships inside the image and needs neither.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    HF_HUB_OFFLINE=0 \
    PROMPTSERVE_STORE_DIR=/data/store \
    PROMPTSERVE_CACHE_DIR=/data/hf/promptserve
USER 10001:10001
WORKDIR /home/promptserve
VOLUME ["/data/store", "/data/hf"]
EXPOSE 8000
# Loading (or first downloading) a large model takes minutes: failures only count after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["promptserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
