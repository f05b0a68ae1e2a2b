# The inference pod image: CUDA runtime, imagefleet, non-root, health check.
# Build: docker build -t imagefleet:dev .   (make images)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models \
    IMAGEFLEET_HOST=0.0.0.0 \
    IMAGEFLEET_PORT=8001

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/imagefleet

ENV PATH=/opt/imagefleet/bin:$PATH

# torch first (the large layer changes least often), then the project.
ARG TORCH_VERSION=2.11.0
RUN pip install "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY imagefleet /src/imagefleet
COPY inference_pod /src/inference_pod
COPY router /src/router
COPY operator /src/operator
RUN pip install /src && rm -rf /src

RUN useradd --create-home --uid 10001 imagefleet && mkdir -p /models && chown imagefleet /models
USER 10001
VOLUME ["/models"]
EXPOSE 8001

# Alive while the process answers; /readyz (model loaded, not quarantined) is for the readiness probe.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS "http://127.0.0.1:${IMAGEFLEET_PORT}/healthz" || exit 1

ENTRYPOINT ["imagefleet"]
CMD ["pod"]
