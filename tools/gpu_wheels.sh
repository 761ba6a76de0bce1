#!/usr/bin/env bash
# Wheels of the Python packages that jinfer and its tests need and the GPU machine's image
# lacks (or holds at too old a version), for that machine's CPython 3.12 on x86-64 Linux, at
# the versions installed in the environment that runs this script (the one `make test` passed
# in). tools/gpu_checks.sh installs whatever lies in .whl/ before it starts.
#
#   tools/gpu_wheels.sh                    # writes .whl/ (git ignores it); PYTHON, DEST override
#
# The machine has no package index, so the wheels travel with the working tree (the device
# tool's limit for that is 64 MiB in all; these come to about 30 MiB). PACKAGES lists what the
# H200 image (as seen in 2026-11 and 2026-12) lacks: ml_collections, the serving packages (grpcio there is older
# than 1.85.1), the HTTP API's, and the notebook runners' with their needs, and a few small
# ones the image has at versions not known to be new enough (anyio, idna, h11, psutil). The
# image has JAX, flax, torch, transformers, pytest, pytest-xdist and pytest-timeout.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
PACKAGES=(
  ml_collections gguf
  grpcio grpcio-health-checking grpcio-reflection grpcio-tools protobuf
  starlette uvicorn pydantic pydantic-core annotated-types typing-inspection typing-extensions
  openai httpx2 httpcore2 jiter sniffio truststore anyio idna h11 psutil
  nbclient nbformat ipykernel jupytext fastjsonschema jsonschema jsonschema-specifications referencing
  rpds-py traitlets jupyter-core jupyter-client platformdirs pyzmq tornado comm debugpy
  nest-asyncio2 ipython ipython-pygments-lexers jedi parso matplotlib-inline pexpect ptyprocess
  prompt-toolkit wcwidth stack-data executing asttokens pure-eval mdit-py-plugins tzdata
)
pins=$("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib import metadata
missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"not installed in {sys.executable}: {' '.join(missing)} (make .venv/.test installs them)")
EOF
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # a wheel left from another version would stop the whole install there
PLATFORMS=()
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_26 \
    manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
# shellcheck disable=SC2086  # one pin per word
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" $pins
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST, $(du -sh "$DEST" | cut -f1) (carry it: the device tool's carry=[\"${DEST#./}\"])"
