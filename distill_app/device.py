"""Turn ``--device auto|cpu|cuda[:N]`` into a ``torch.device``, failing early and clearly."""

from __future__ import annotations

import torch

from .errors import DistillError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when a GPU is visible, else cpu; ``"cpu"``; ``"cuda"`` or ``"cuda:N"``.

    Asking for CUDA on a machine without it is a user error (DistillError), not a silent
    fallback: a run the user believes is on the GPU would otherwise take 50x longer.
    """
    value = (name or "auto").strip().lower()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DistillError(f"--device {name}: no CUDA GPU is visible; use --device cpu or auto")
        index = value.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                last = torch.cuda.device_count() - 1
                raise DistillError(f"--device {name}: no such GPU; valid: cuda:0..cuda:{last}")
        return torch.device(value)
    raise DistillError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
