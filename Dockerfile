# e2llm-edge image, two targets:
#   agent: a device; only the base dependencies (numpy, onnxruntime, onnx, msgpack, aiomqtt,
#          pyyaml)
#   fog:   orchestrator, exporter, monitor, HTTP gateway (extras "fog" and "gateway": tokenizer,
#          planner GA, rich, gguf, aiohttp, prometheus-client)
# docker-compose builds both (compose.yaml); by hand:
#   docker build --target agent -t e2llm-edge:agent .
#   docker build --target fog -t e2llm-edge:fog .
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    E2LLM_SECRETS=/run/e2llm-secrets
RUN useradd --create-home --uid 10001 --user-group e2llm \
    && install -d -o e2llm -g e2llm /models
WORKDIR /src
COPY pyproject.toml README.md ./
COPY e2llm_edge ./e2llm_edge
COPY onnx_export ./onnx_export
COPY planner ./planner
COPY docker/entrypoint.sh /usr/local/bin/e2llm-entrypoint
# Starts as root only to hand the mounted secrets to the e2llm user, then drops to it.
ENTRYPOINT ["e2llm-entrypoint"]
CMD ["e2llm", "--help"]

FROM base AS agent
RUN pip install . && rm -rf /src/build

FROM base AS fog
RUN pip install ".[fog,gateway]" && rm -rf /src/build
