# Stand-in for redis:7 (built by ../build-base-images.sh only where it cannot be pulled): Debian
# 12's redis-server 7.0 with the official image's contract: `redis-server [args]` as the command,
# /data as the working directory (where --appendonly writes), run as the redis user, protected
# mode off when no config file is given (the container network is the boundary), redis-cli on PATH.
ARG BASE=halos-base/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
LABEL org.halos.standin="Debian bookworm redis-server 7.0 (scripts/docker/build-base-images.sh)"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
