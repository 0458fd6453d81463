# Stand-in for postgres:16 (built by ../build-base-images.sh only where it cannot be pulled).
# Debian 12 ships PostgreSQL 15, so this is 15 under the tag the compose file names. It keeps the
# official image's contract that docker-compose.yml relies on: PGDATA=/var/lib/postgresql/data
# initialised on first start with POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB (password auth
# over the network, trust on the local socket), `postgres` as the command, run as the postgres
# user, pg_isready on PATH, SIGINT (fast shutdown) as the stop signal.
ARG BASE=halos-base/debian:bookworm
FROM ${BASE}
# no cluster from the package's postinst: the entrypoint initialises PGDATA as the official image does
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/run/postgresql /var/lib/postgresql/data \
 && chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
LABEL org.halos.standin="Debian bookworm PostgreSQL 15 (scripts/docker/build-base-images.sh)"
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
