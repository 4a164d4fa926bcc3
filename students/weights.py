"""Weight files for models: reading a state dict safely, and copying one in by position when the
key names differ but the layout is the same (TF ports, timm vs torchvision). Shared by the
students and by the application's local teachers; errors are ValueError with a one-line reason.
"""

from __future__ import annotations

import torch
from torch import nn


def read_state_dict(path: str, what: str = "weights file") -> dict[str, torch.Tensor]:
    """A state dict from ``path``: bare, or under "state_dict"/"model"; DDP "module." stripped."""
    return read_weights(path, what)[0]


def read_weights(path: str, what: str = "weights file") -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, the file's other top-level entries, e.g. ``normalize``) from ``path``.

    ``weights_only``: a weights file is data, never code (a pickle could run anything).
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read {what} {path}: {first_line(exc)}") from exc
    extras: dict = {}
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            extras = {k: v for k, v in data.items() if k != key}
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} is not a state dict (tensors by name)")
    return {k.removeprefix("module."): v for k, v in data.items()}, extras


def copy_by_position(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Load ``state`` into ``model`` tensor by tensor, in order, checking every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise ValueError(f"{source} holds {len(state)} tensors but the model expects {len(target)}: "
                         "wrong weights file")
    renamed = {}
    for index, ((key, want), (src_key, tensor)) in enumerate(zip(target.items(), state.items())):
        if tensor.shape != want.shape:
            raise ValueError(f"{source}: tensor #{index} {src_key} has shape {tuple(tensor.shape)}, "
                             f"{key} needs {tuple(want.shape)}: wrong weights file")
        renamed[key] = tensor
    model.load_state_dict(renamed, strict=True)


def first_line(exc: BaseException) -> str:
    """An exception as one short line. (The application has its own ``errors.one_line``;
    students never import the application, so this layer keeps this small copy.)"""
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__
