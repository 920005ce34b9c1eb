# The project's CPU Triton image, from registry packages only: the tritonserver 2.51 of the
# nvidia-pytriton 0.7.0 wheel (PyPI) with the wheel's python backend, and ONNX Runtime
# 1.32.0 from PyPI, which the project's model.py runs inside that backend. It serves what
# `mnist-pipeline pin --triton-backend python` writes (the chart: images.triton.backend
# python). The chart's default, NVIDIA's nvcr.io/nvidia/tritonserver:24.10-py3 (the same
# release, r24.10), serves the exported repository as it is, on CPUs or GPUs.
# Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t mnist-pipeline/triton:0.2.0 .
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The wheel for its files alone: nothing of its Python runs in the image.
RUN python -m venv /opt/pytriton \
    && /opt/pytriton/bin/pip install --no-cache-dir --no-deps nvidia-pytriton==0.7.0
# What model.py imports, pinned as in pyproject.toml.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir numpy==1.26.4 onnxruntime==1.32.0
# /stage becomes /opt/tritonserver: bin/tritonserver finds lib/ (the wheel's libraries)
# through its RPATH, $ORIGIN/../lib, and backends/ is its default --backend-directory:
# python/ holds the backend, its utilities and the stub built for this image's Python.
RUN SP=$(/opt/pytriton/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
    && WHEEL="$SP/pytriton/tritonserver" \
    && PY=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    && mkdir -p /stage/bin /stage/backends/python \
    && cp "$WHEEL/bin/tritonserver" /stage/bin/ \
    && cp -r "$SP/nvidia_pytriton.libs" /stage/lib \
    && cp "$WHEEL/backends/python/libtriton_python.so" \
          "$WHEEL/backends/python/triton_python_backend_utils.py" \
          "$WHEEL/python_backend_stubs/$PY/triton_python_backend_stub" /stage/backends/python/

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mnist-pipeline-triton" \
      org.opencontainers.image.description="mnist-pipeline: Triton 2.51 (CPU), python backend with ONNX Runtime" \
      org.opencontainers.image.source="https://github.com/mnist-pipeline/mnist-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0 AND BSD-3-Clause AND MIT"
COPY --from=build /stage /opt/tritonserver
COPY --from=build /opt/venv /opt/venv
# The backend and its stub (a process of its own) load the wheel's libraries from lib/, the
# stub libpython from the base image. The stub's interpreter is the base image's Python:
# model.py puts PYTHONPATH, the venv's packages, on its sys.path.
# ONNX Runtime writes a small cache under $HOME: /tmp is the only writable path.
ENV PATH=/opt/tritonserver/bin:$PATH \
    LD_LIBRARY_PATH=/opt/tritonserver/lib \
    PYTHONPATH=/opt/venv/lib/python3.11/site-packages \
    HOME=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001 8002
# No entrypoint, as NVIDIA's image (whose entrypoint execs its arguments): the chart's args,
# `tritonserver --model-repository=...`, run unchanged on either image.
CMD ["tritonserver", "--help"]
