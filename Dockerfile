# Two images from one file (make images builds both):
#
#   docker build --target pod     -t ghcr.io/imagefleet/imagefleet:0.1.0 .          inference pods (CUDA, torch)
#   docker build --target control -t ghcr.io/imagefleet/imagefleet-control:0.1.0 .  operator and router (no torch)
#
# Both run as the non-root user 10001, need no writable root filesystem (pods mount /tmp and the
# model cache; see docs/operator.md) and start the `imagefleet` command.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG PYTHON_IMAGE=python:3.12-slim

# --- the wheel, built once for both images ------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
COPY pyproject.toml README.md /src/
COPY imagefleet /src/imagefleet
COPY inference_pod /src/inference_pod
COPY router /src/router
COPY operator /src/operator
RUN pip wheel --no-deps -w /wheels /src

# --- operator and router: the small control image -----------------------------------------------
FROM ${PYTHON_IMAGE} AS control
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HOME=/tmp
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/imagefleet-*.whl && rm -rf /wheels \
 && useradd --no-create-home --uid 10001 imagefleet
USER 10001
EXPOSE 8000 8080
ENTRYPOINT ["imagefleet"]
CMD ["operator"]

# --- inference pods: CUDA runtime, torch, diffusers ---------------------------------------------
FROM ${CUDA_IMAGE} AS pod
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    HF_HOME=/models/huggingface \
    IMAGEFLEET_HOST=0.0.0.0 \
    IMAGEFLEET_PORT=8001
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/imagefleet
ENV PATH=/opt/imagefleet/bin:$PATH
# torch first (the large layer changes least often), then the project with its pod extras.
ARG TORCH_VERSION=2.11.0
RUN pip install "torch==${TORCH_VERSION}"
# POD_EXTRAS=pod leaves FlashAttention-4 out (pods then use PyTorch's attention kernels).
ARG POD_EXTRAS=pod,fa4
COPY --from=wheel /wheels /wheels
RUN whl=$(ls /wheels/imagefleet-*.whl) && pip install "${whl}[${POD_EXTRAS}]" && rm -rf /wheels \
 && useradd --no-create-home --uid 10001 imagefleet && mkdir -p /models && chown 10001 /models
USER 10001
VOLUME ["/models"]
EXPOSE 8001
# Alive while the process answers; /readyz (model loaded, not quarantined) is for readiness.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${IMAGEFLEET_PORT}/healthz" || exit 1
ENTRYPOINT ["imagefleet"]
CMD ["pod"]
