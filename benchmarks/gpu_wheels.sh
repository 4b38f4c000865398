#!/usr/bin/env bash
# Fetch, here, the wheels that benchmarks/gpu_check.sh needs on the GPU machine: the packages its
# image (Python 3.12, torch, numpy, scipy, h5py, msgpack, httpx, pytest, ...) lacks, as cp312
# manylinux x86_64 wheels pinned to the versions in .venv, into .whl (ignored through
# .git/info/exclude; the device tool's `carry: [".whl"]` takes it along, 64 MiB with the repo).
#
#   bash benchmarks/gpu_wheels.sh
#
# Left out on purpose: hdf5plugin (a 46 MB wheel; only imported when present, for compressed HDF5
# chunks, which the check does not read) and tiled (the check runs `scatterflow bench --no-tiled`).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}

PACKAGES=(
    # integration: workers.geometry / workers.integrate build on pyFAI (detectors, pixel corners),
    # and pyFAI is the reference the benchmark compares against
    pyFAI silx fabio numexpr
    # the lmfit baselines of bench_fit.py and `scatterflow bench`
    lmfit asteval uncertainties dill
    # the service: settings, 0MQ ingest and the bench's sender, bluesky's 0MQ proxy, the REST API
    pydantic pydantic-core annotated-types typing-inspection pydantic-settings python-dotenv
    pyzmq msgpack-numpy event-model jsonschema jsonschema-specifications referencing rpds-py
    bluesky opentelemetry-api
    fastapi starlette uvicorn fastapi-offline orjson
    # the device has it, but pydantic needs >= 4.16 and the image's version is not known here
    typing-extensions
)

# NAME==VERSION as installed in .venv (names compared as pip normalises them)
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
FREEZE=$("$PIP" freeze)
PINS=()
for p in "${PACKAGES[@]}"; do
    v=$(echo "$FREEZE" | awk -F'==' -v want="$(norm "$p")" \
        '{n = tolower($1); gsub(/[_.]/, "-", n); if (n == want) print $2}')
    [ -n "$v" ] || { echo "gpu_wheels: $p is not installed in .venv" >&2; exit 1; }
    PINS+=("$p==$v")
done

EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
rm -rf .whl && mkdir .whl     # one version of each: two stop the whole install there
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${PINS[@]}"

ls -S -s --block-size=K .whl | sed 1d
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
echo "repo (tracked and untracked-not-ignored): $( (git ls-files; git ls-files --others --exclude-standard) \
    | tr '\n' '\0' | du -ch --files0-from=- 2>/dev/null | tail -1 | cut -f1)  (the device tool allows 64 MiB in all)"
