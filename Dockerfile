# fl-node in a container: one `fl-node start` per container, as a non-root user, its state
# (key, trust store, checkpoints, metrics) on the /data volume. Build, run, compose, GPUs and
# offline builds: docs/docker.md.
#
#   docker build -t fl-node .                       # CPU image (torch from PyTorch's CPU index)
#   docker build -t fl-node:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .

# The base image must have Python 3.11 or newer as `python3`, with its venv module.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Where torch and torchvision come from (a pip index). The default, PyTorch's CPU-only index,
# gives a small image without CUDA libraries; another index gives another build (GPUs:
# docs/docker.md). Every other package comes from pip's default index, PyPI, or from the one
# passed as --build-arg PIP_INDEX_URL=... (with PIP_TRUSTED_HOST for a plain-http mirror).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST

ENV PATH=/opt/fl-node/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed uid, so that volumes and mounted files can be given to it (chown 10001).
RUN useradd --system --no-log-init --uid 10001 --user-group --home-dir /data \
        --shell /usr/sbin/nologin fl-node \
    && mkdir -p /data /etc/fl-node \
    && chown fl-node:fl-node /data \
    && chmod 0700 /data

# Dependencies first (their layer is reused until pyproject.toml changes): torch and
# torchvision from TORCH_INDEX_URL, the rest from the default index. The pins are read from
# pyproject.toml, the one place they are written. The node runs as a user who cannot write
# here, so bytecode is compiled now (on every core; pip would do it one file at a time).
COPY pyproject.toml /src/fl-node/
RUN python3 -m venv /opt/fl-node \
    && python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        /src/fl-node/pyproject.toml > /src/requirements.txt \
    && grep -E '^torch(vision)?[=<>~! ]' /src/requirements.txt > /src/torch.txt \
    && pip install --no-compile --index-url "$TORCH_INDEX_URL" -r /src/torch.txt \
    && pip install --no-compile -r /src/requirements.txt \
    && (python -m compileall -q -j 0 /opt/fl-node/lib > /dev/null || true) \
    && python -c 'import torch; torch.set_num_threads(1); print("torch", torch.__version__)'

COPY README.md /src/fl-node/
COPY node /src/fl-node/node
COPY protocol /src/fl-node/protocol
COPY ml /src/fl-node/ml
COPY tui /src/fl-node/tui
COPY deploy/entrypoint.py /opt/fl-node/bin/fl-node-entrypoint
RUN pip install --no-deps /src/fl-node \
    && chmod 0755 /opt/fl-node/bin/fl-node-entrypoint \
    && rm -rf /src \
    && fl-node --help > /dev/null

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# 7700: peer traffic (TCP). 7800: dashboard and API. mDNS (UDP 5353) works on the container's
# own network (a user-defined bridge); it does not cross into the host's LAN.
EXPOSE 7700 7800

# The node's web API answers /healthz from inside the container (127.0.0.1 is always an
# allowed Host); `fl-node-entrypoint --healthcheck` asks it, on FL_NODE_WEB_PORT if set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["fl-node-entrypoint", "--healthcheck"]

# SIGTERM stops the node gracefully (exit 0) after its current step; the entry point execs
# fl-node, so the node is PID 1 and gets the signal itself.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fl-node-entrypoint"]
CMD []
