# The client image: `mnist-pipeline infer` (gRPC to Triton) and `mnist-pipeline wait`.
# No torch: the `client` extra holds numpy, tritonclient and matplotlib only.
# Build from the repository root:
#   docker build -f docker/client.Dockerfile -t mnist-pipeline/client:0.2.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir "/src[client]"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mnist-pipeline-client" \
      org.opencontainers.image.description="mnist-pipeline: gRPC client for Triton and the chart's waits" \
      org.opencontainers.image.source="https://github.com/mnist-pipeline/mnist-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MNIST_PIPELINE_STORAGE=/storage \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["mnist-pipeline"]
CMD ["--help"]
