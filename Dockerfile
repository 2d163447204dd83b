# syntax=docker/dockerfile:1
# Pollinate's App executor: Flower's SuperExec image with this app installed.
#
# Flower 1.39 runs Apps outside the SuperLink/SuperNode processes when they use
# `--isolation process`: a `flower-superexec` next to the SuperLink launches one
# `flwr-serverapp` per run, and one next to each SuperNode launches one `flwr-clientapp`
# per round. Those processes import `pollinate`, so they run from this image; the
# SuperLink and SuperNodes use Flower's stock images (see docker-compose.yml).
ARG FLWR_VERSION=1.39.0
FROM flwr/superexec:${FLWR_VERSION}

# CPU wheels by default; the GPU executor builds with the CUDA index instead
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /app
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app pollinate pollinate
COPY --chown=app:app server server
COPY --chown=app:app client client
COPY --chown=app:app aggregators aggregators
COPY --chown=app:app protos protos
COPY --chown=app:app simulations simulations
# flwr is the image's own; drop the simulation extra (Ray is not needed to deploy)
RUN sed -i 's/"flwr\[simulation\]~=/"flwr~=/' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import pollinate.server.app, pollinate.client.app"

# dependencies are baked in; nothing is fetched at run time, nothing phones home
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    HF_HUB_OFFLINE=1

ENTRYPOINT ["flower-superexec"]
