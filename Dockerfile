# halos-server: one image for the API (`halos serve --no-worker`), the workers (`halos worker`) and
# the one-shot migration (`alembic upgrade head`). See docker-compose.yml.
#
# Python packages are installed with requirements.lock as constraints (the tested set).
# torch comes from PyPI by default, whose Linux x86_64 wheels are CUDA builds that bundle the CUDA
# runtime (nvidia-* wheels); the host only needs the NVIDIA driver + container toolkit. To pin a
# CUDA variant: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Builds that cannot reach PyPI from inside `docker build`: scripts/docker/build-wheelhouse.sh
# fills ./wheelhouse on the host, then --build-arg WHEELHOUSE=1 installs from it alone (the wheels
# stay in one layer of the image). The base image: scripts/docker/build-base-images.sh.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=""
ARG WHEELHOUSE=""
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HALOS_DATA_DIR=/data

RUN apt-get update \
 && apt-get install -y --no-install-recommends tini build-essential git curl \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv

WORKDIR /app

# 1. dependencies only (a cached layer that changes when pyproject.toml, the lock or the wheels do)
COPY wheelhouse /wheelhouse
COPY pyproject.toml README.md requirements.lock ./
RUN if [ -n "$WHEELHOUSE" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
 && pip install --upgrade pip setuptools wheel \
 && if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch -c requirements.lock; fi \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt -c requirements.lock \
 && rm /tmp/requirements.txt

# 2. the project (editable: alembic.ini and migrations/ stay next to the code, where
#    `alembic upgrade head` and `halos migrate` find them)
COPY alembic.ini ./
COPY migrations ./migrations
COPY halos_core ./halos_core
COPY halos_client ./halos_client
COPY server ./server
COPY worker ./worker
RUN pip install --no-deps --no-build-isolation -e . \
 && python -c "import server.cli, worker.app, halos_core.config, halos_client" \
 && useradd --create-home --uid 1000 halos \
 && mkdir -p /data \
 && chown -R halos:halos /data

USER halos
VOLUME ["/data"]
EXPOSE 8000

# tini reaps orphans (a killed rank's children) so process-group checks never see zombies linger,
# and forwards SIGTERM to `halos`, whose worker then shuts down warm (jobs are released).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["halos", "serve", "--host", "0.0.0.0", "--port", "8000"]
