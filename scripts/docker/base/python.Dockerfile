# Stand-in for python:3.11-slim-bookworm (built by ../build-base-images.sh only where it cannot be
# pulled): Debian 12's python3.11 with venv and pip, `python`/`pip` on PATH, and no
# EXTERNALLY-MANAGED marker, like the official image.
ARG BASE=halos-base/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && ln -s /usr/bin/pip3 /usr/local/bin/pip \
 && python --version
ENV LANG=C.UTF-8
LABEL org.halos.standin="Debian bookworm python3.11 (scripts/docker/build-base-images.sh)"
CMD ["python3"]
