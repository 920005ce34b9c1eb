# The CPU Triton image: the tritonserver 2.51 that `make run` and the tests serve with (from
# the nvidia-pytriton 0.7.0 wheel), Triton's onnxruntime backend built by
# scripts/build_triton_backend.sh, ONNX Runtime 1.19.2. The chart's default Triton image;
# NVIDIA's tritonserver:24.10-py3 (the same release, r24.10) stays the choice for GPU nodes.
# Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t mnist-pipeline/triton:0.2.0 .
# Offline (no GitHub): TRITON_SOURCES_URL=<a URL serving the archives of ../shared/vendor,
# with its SHA256SUMS>; the build checks them against the script's pins.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian's build tools of the stage that is thrown away; the final stage installs nothing.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ make cmake git curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir nvidia-pytriton==0.7.0
COPY scripts/build_triton_backend.sh scripts/triton_pins.sh /src/
ARG TRITON_SOURCES_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /vendor
RUN if [ -n "${TRITON_SOURCES_URL}" ]; then \
        curl -fsS -o SHA256SUMS "${TRITON_SOURCES_URL}/SHA256SUMS" \
        && awk '{print $2}' SHA256SUMS | while read -r f; do \
               curl -fsS --create-dirs -o "$f" "${TRITON_SOURCES_URL}/$f"; done \
        && export TRITON_SOURCES=/vendor; \
    fi \
    && PYTHON=/opt/venv/bin/python /src/build_triton_backend.sh /stage/backends \
    && SP=$(python -c 'import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parents[1])') \
    && mkdir -p /stage/bin \
    && cp "$SP/pytriton/tritonserver/bin/tritonserver" /stage/bin/ \
    && cp -r "$SP/nvidia_pytriton.libs" /stage/lib \
    && SERVER_LIB=$(basename "$(readlink /stage/backends/onnxruntime/libtritonserver.so)") \
    && ln -sf "../../lib/${SERVER_LIB}" /stage/backends/onnxruntime/libtritonserver.so \
    && rm /stage/backends/onnxruntime/.pins

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mnist-pipeline-triton" \
      org.opencontainers.image.description="mnist-pipeline: Triton 2.51 (CPU) with the onnxruntime backend" \
      org.opencontainers.image.source="https://github.com/mnist-pipeline/mnist-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0 AND BSD-3-Clause AND MIT"
# tritonserver finds its libraries through its RPATH ($ORIGIN/../lib) and its backends in
# its default --backend-directory, /opt/tritonserver/backends.
COPY --from=build /stage /opt/tritonserver
# ONNX Runtime writes a small cache under $HOME: /tmp is the only writable path.
ENV PATH=/opt/tritonserver/bin:$PATH \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
# No entrypoint, as NVIDIA's image (whose entrypoint execs its arguments): the chart's args,
# `tritonserver --model-repository=...`, run unchanged on either image.
CMD ["tritonserver", "--help"]
