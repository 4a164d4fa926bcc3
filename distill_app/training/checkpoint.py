"""The student file ``model.pt``: weights plus everything eval and export need, written atomically.

Layout (plain Python types only, so it loads with ``torch.load(weights_only=True)``)::

    {"format": "distill-student/1",
     "state_dict": {...},
     "student": {"name", "num_classes", "width", "image_size", "mean", "std"},
     "classes": [str, ...],           # output index -> class name
     "teachers": [str, ...],          # teacher specs whose answers were the targets
     "metrics": {...},                # best validation metrics
     "config": {...}}                 # the resolved training configuration
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from students import create_student

from ..errors import DistillError

FORMAT = "distill-student/1"


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash (or a full disk) mid-write leaves the previous file intact; a kill may leave a
    stray temporary file, which the next save removes. One writer per file (rank 0).
    """
    path = Path(path)
    # A temporary file of an earlier writer that was killed mid-write: never trusted, removed.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_student(path, model: torch.nn.Module, meta: dict) -> None:
    """Write ``model.pt``; ``meta`` holds the keys of the layout above except state_dict."""
    module = getattr(model, "module", model)  # unwrap DDP / compiled wrappers
    module = getattr(module, "_orig_mod", module)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    atomic_save({"format": FORMAT, **meta, "state_dict": state}, path)


def read_student(path: str | os.PathLike) -> dict:
    """The raw contents of a ``model.pt`` (or of the ``model.pt`` inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise DistillError(f"no student at {path}: pass the run folder written by `distill train`")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read {path} ({type(e).__name__}); is it a distill model.pt?") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DistillError(f"{path} is not a distill student file (format {FORMAT})")
    return blob


def load_student(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode on CPU, metadata) from a run folder or ``model.pt``."""
    blob = read_student(path)
    s = blob["student"]
    model = create_student(s["name"], num_classes=s["num_classes"], width=s["width"],
                           image_size=s["image_size"])
    model.load_state_dict(blob.pop("state_dict"))
    return model.eval(), blob
