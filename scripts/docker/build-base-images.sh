#!/usr/bin/env bash
# Make the base images that Dockerfile and docker-compose.yml name available to the local Docker
# engine: python:3.11-slim-bookworm, postgres:16, redis:7.
#
# Each image: already present → left alone; `docker pull` works → pulled (the normal case, and
# the only one a machine with Docker Hub ever reaches); the pull fails (no registry access, e.g. an
# air-gapped build box) → a stand-in is built from Debian packages under the same tag, so
# docker-compose.yml runs unchanged:
#   1. debootstrap a minimal Debian root (DEBIAN_SUITE, default bookworm) and `docker import` it
#      as halos-base/debian:<suite>;
#   2. one Dockerfile per image in scripts/docker/base/ installs Debian's python3.11 /
#      postgresql / redis-server and copies an entrypoint that keeps the part of the official
#      image's contract that the compose file relies on (POSTGRES_USER/POSTGRES_PASSWORD/
#      POSTGRES_DB and a pg_isready health check; redis-server args, /data, redis-cli ping).
# Stand-ins carry the label org.halos.standin=<what they really are>; see it with
#   docker image inspect -f '{{index .Config.Labels "org.halos.standin"}}' postgres:16
# Debian 12 ships PostgreSQL 15, not 16: the postgres:16 stand-in runs PostgreSQL 15 (the version
# the project's tests run on; the schema uses nothing newer).
#
# Usage: scripts/docker/build-base-images.sh [--standins]   (--standins: build them even where a
#        pull would work, e.g. to test this script)
# Needs: root (debootstrap), the Docker engine, the debootstrap package, and a Debian mirror
# (DEBIAN_MIRROR, default http://deb.debian.org/debian) reachable from the host and from containers.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
rootfs_tag="halos-base/debian:${suite}"
force=0
[[ "${1:-}" == "--standins" ]] && force=1

# image tag → Dockerfile of its stand-in
declare -A standin=(
  ["python:3.11-slim-bookworm"]="python.Dockerfile"
  ["postgres:16"]="postgres.Dockerfile"
  ["redis:7"]="redis.Dockerfile"
)

have() { docker image inspect "$1" >/dev/null 2>&1; }

build_rootfs() {
  have "$rootfs_tag" && return 0
  command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }
  local dir
  dir="$(mktemp -d /tmp/halos-rootfs.XXXXXX)"
  trap 'rm -rf "$dir"' RETURN
  echo "debootstrap $suite from $mirror (a minute or two)"
  debootstrap --variant=minbase "$suite" "$dir" "$mirror" >/tmp/halos-debootstrap.log 2>&1 \
    || { tail -20 /tmp/halos-debootstrap.log >&2; exit 1; }
  # the sources an official debian image has: updates and security too
  cat >"$dir/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  tar -C "$dir" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
    -c 'CMD ["bash"]' - "$rootfs_tag" >/dev/null
  echo "imported $rootfs_tag"
}

for image in "python:3.11-slim-bookworm" "postgres:16" "redis:7"; do
  if (( ! force )) && have "$image"; then
    echo "$image: present"
    continue
  fi
  if (( ! force )) && docker pull -q "$image" >/dev/null 2>&1; then
    echo "$image: pulled"
    continue
  fi
  echo "$image: no pull possible; building a stand-in from Debian packages"
  build_rootfs
  docker build -q --build-arg BASE="$rootfs_tag" -t "$image" -f "$here/base/${standin[$image]}" "$here/base" >/dev/null
  echo "$image: built ($(docker image inspect -f '{{index .Config.Labels "org.halos.standin"}}' "$image"))"
done
