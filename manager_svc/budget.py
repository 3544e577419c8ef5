"""Memory budgets per GPU: configured on CPU, detected on CUDA (total memory x utilisation cap)."""
from __future__ import annotations

from roundhouse.catalogue import GpuSpec


def detect_total_bytes(gpu_id: str) -> int:
    """Total memory of a CUDA device ("cuda:0"); raises where there is none."""
    import torch  # only on CUDA hosts; the manager does not need torch otherwise

    index = int(gpu_id.split(":", 1)[1]) if ":" in gpu_id else 0
    if not torch.cuda.is_available():
        raise RuntimeError(f"roundhouse: {gpu_id} has no configured budget_bytes and CUDA is not available")
    return torch.cuda.get_device_properties(index).total_memory


def budgets(gpus: tuple[GpuSpec, ...]) -> dict[str, int]:
    out = {}
    for g in gpus:
        out[g.id] = g.budget_bytes or int(detect_total_bytes(g.id) * g.utilization)
    return out

