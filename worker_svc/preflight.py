"""Cheap checks that a model directory can load at all, before anything is evicted for it.

Reads only headers: config.json must parse, and every safetensors file must have a valid
header whose tensors end exactly at the end of the file (a truncated or corrupt file fails).
"""
from __future__ import annotations

import json
import pathlib
import struct


def check(model_dir: str) -> str:
    """'' when the directory looks loadable, else what is wrong with it."""
    root = pathlib.Path(model_dir)
    if not root.is_dir():
        return f"model directory {model_dir} does not exist"
    try:
        json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as e:
        return f"config.json unreadable: {e}"
    files = sorted(root.glob("*.safetensors"))
    if not files and not list(root.glob("*.bin")):
        return f"no weights (*.safetensors) in {model_dir}"
    for f in files:
        problem = _check_safetensors(f)
        if problem:
            return f"{f.name}: {problem}"
    return ""


def _check_safetensors(path: pathlib.Path) -> str:
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            return "truncated before its header"
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            return "corrupt header length"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "corrupt header"
    if not isinstance(header, dict):
        return "corrupt header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
    if 8 + n + max(ends, default=0) != size:
        return f"size {size} does not match its header ({8 + n + max(ends, default=0)} bytes): truncated or corrupt"
    return ""

