#!/usr/bin/env bash
# Fill ./wheelhouse with every wheel the image installs, downloaded by the HOST's pip, for builds
# where pip inside `docker build` cannot reach PyPI (no network from containers, a proxy or a
# TLS-intercepting CA that only the host trusts). Then build with the wheelhouse alone:
#
#   scripts/docker/build-wheelhouse.sh
#   HALOS_WHEELHOUSE=1 docker compose build          # docker build --build-arg WHEELHOUSE=1 .
#
# The set is the project's dependencies with requirements.lock as constraints (what the Dockerfile
# installs), plus pip/setuptools/wheel, as wheels for CPython 3.11 on glibc 2.36 x86_64 (the
# python:3.11-slim-bookworm base). torch: TORCH_SPEC (default: the lock's torch==2.13.0) comes
# from wherever the host's pip takes it — PyPI's CUDA build, or a local CPU wheel where the host's
# pip configuration lists one (find-links); TORCH_INDEX_URL picks another index for torch
# (e.g. https://download.pytorch.org/whl/cpu).
#
# Needs the Docker engine and the base image (scripts/docker/build-base-images.sh): the set is
# checked offline by the image's own pip.
# Env: PYTHON (default .venv/bin/python, else python3), TORCH_SPEC, TORCH_INDEX_URL,
#      GLIBC_MINOR (default 36: bookworm's glibc 2.36; wheels up to manylinux_2_<that> are taken).
set -euo pipefail
cd "$(dirname "$0")/../.."

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
# pip does not widen --platform to older manylinux levels: list them (glibc 2.5 … 2.36)
glibc_max="${GLIBC_MINOR:-36}"
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
        --platform any --platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for minor in $(seq 5 "$glibc_max"); do target+=(--platform "manylinux_2_${minor}_x86_64"); done
dest="wheelhouse"
mkdir -p "$dest"
reqs="$(mktemp)"
trap 'rm -f "$reqs"' EXIT
"$python" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >"$reqs"

# torch first, on its own (its own index if asked), so the resolver below finds it in the wheelhouse
torch_index=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && torch_index=(--index-url "$TORCH_INDEX_URL")
"$python" -m pip download -q -d "$dest" "${target[@]}" "${torch_index[@]}" --no-deps "$torch_spec"
"$python" -m pip download -q -d "$dest" "${target[@]}" --find-links "$dest" \
  -c requirements.lock -r "$reqs" pip setuptools wheel

# The host's pip evaluates environment markers with the HOST's interpreter (e.g. redis needs
# async-timeout only below Python 3.11.3, and Debian 12 has 3.11.2): resolve the set offline with
# the base image's own interpreter and fetch whatever it still lacks, until nothing is missing.
base="python:3.11-slim-bookworm"
for round in $(seq 1 10); do
  if (( round == 10 )); then echo "wheelhouse: still incomplete after 9 fetches" >&2; exit 1; fi
  out="$(docker run --rm --network none -v "$PWD/$dest:/wheelhouse:ro" -v "$reqs:/tmp/reqs.txt:ro" \
    -v "$PWD/requirements.lock:/tmp/lock.txt:ro" "$base" sh -c 'python -m venv /tmp/v >/dev/null &&
      /tmp/v/bin/pip install -q --dry-run --no-index --find-links /wheelhouse -r /tmp/reqs.txt -c /tmp/lock.txt \
        pip setuptools wheel 2>&1' || true)"
  # "No matching distribution found for async-timeout>=4.0.3; python_full_version < ..." → the requirement
  missing="$(sed -n 's/.*No matching distribution found for \([^;]*\).*$/\1/p' <<<"$out" | head -1)"
  if [[ -z "$missing" ]]; then
    if grep -q ERROR <<<"$out"; then echo "$out" >&2; exit 1; fi
    break
  fi
  echo "the image's python also needs $missing"
  before="$(ls "$dest" | wc -l)"
  "$python" -m pip download -q -d "$dest" "${target[@]}" --find-links "$dest" -c requirements.lock "$missing"
  if [[ "$(ls "$dest" | wc -l)" == "$before" ]]; then echo "wheelhouse: pip found no wheel for $missing" >&2; exit 1; fi
done
echo "wheelhouse: $(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) ($(ls "$dest" | grep -m1 '^torch-'))"
