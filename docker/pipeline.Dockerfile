# The pipeline image: `mnist-pipeline` data, train, export and wait (the chart's initContainers),
# with verified MNIST baked in to seed the volume. Build from the repository root:
#   docker build -f docker/pipeline.Dockerfile -t mnist-pipeline/pipeline:0.2.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, its CPU build pinned (+cpu): the PyPI wheel of torch==2.13.0 pulls CUDA (GBs).
# The package's `train` and `export` extras then find the pin already satisfied. Where
# PyTorch's index is unreachable: TORCH_INDEX_URL=https://pypi.org/simple (torch's
# dependencies) and TORCH_FIND_LINKS=<a folder or URL holding the torch wheel>. A CUDA build
# for training.gpus: TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 TORCH_VERSION=2.13.0+cu126
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=""
ARG TORCH_VERSION=2.13.0+cpu
RUN PIP_FIND_LINKS="${TORCH_FIND_LINKS}" \
    pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir "/src[train,export]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mnist-pipeline" \
      org.opencontainers.image.description="mnist-pipeline: data, train, export and the chart's waits" \
      org.opencontainers.image.source="https://github.com/mnist-pipeline/mnist-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
# Verified MNIST: `mnist-pipeline data` seeds the volume from here, never from the network.
COPY data/mnist /opt/mnist
# HOME and caches under /tmp: the chart mounts the root filesystem read-only, /tmp writable.
ENV PATH=/opt/venv/bin:$PATH \
    MNIST_PIPELINE_SOURCE=/opt/mnist \
    MNIST_PIPELINE_STORAGE=/storage \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["mnist-pipeline"]
CMD ["--help"]
