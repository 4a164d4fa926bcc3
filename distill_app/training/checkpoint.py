"""The run folder's files, and the student file ``model.pt``: weights plus everything eval,
export and prune need (:class:`StudentFile`), read and written here only, atomically.

Layout (plain Python types only, so it loads with ``torch.load(weights_only=True)``)::

    {"format": "distill-student/1",
     "state_dict": {...},
     "student": {"name", "num_classes", "width", "image_size", "mean", "std", "hidden_channels"},
     "classes": [str, ...],           # output index -> class name
     "teachers": [str, ...],          # teacher specs whose answers were the targets
     "metrics": {...},                # best validation metrics
     "config": {...},                 # the resolved training configuration
     "label_map": {...} | None,       # class -> teacher labels, as trained
     "pruning": {...} | None,         # what `distill prune` did, for pruned students
     "compression": {...} | None,     # what `distill compress` did, for .dc files
     "weights": {...} | None}         # the initial weights: source, mean, std, note

A ``.dc`` file of ``distill compress`` (students/codec.py) holds the same dict, its weights coded;
:func:`read_student` decodes it, so every command that opens a student opens those too.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from students import StudentConfig, codec, create_student

from ..errors import DistillError

FORMAT = "distill-student/1"
# The files of a run folder (train writes them all; prune writes model, config and metrics).
MODEL_FILE, CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE, CURVES_FILE = (
    "model.pt", "last.pt", "metrics.jsonl", "config.json", "curves.png")


@dataclass
class StudentFile:
    """What ``model.pt`` holds besides the weights."""

    student: StudentConfig
    classes: list[str]  # output index -> class name
    teachers: list[str] = field(default_factory=list)  # SPEC or SPEC@WEIGHT, as trained
    metrics: dict = field(default_factory=dict)  # best validation metrics
    config: dict = field(default_factory=dict)  # the resolved training configuration
    label_map: dict | None = None  # class -> teacher labels (None: the teacher's own vocabulary)
    pruning: dict | None = None  # for pruned students: amount, widths, before/after
    weights: dict | None = None  # where the initial weights came from (students.Weights.to_dict)
    compression: dict | None = None  # for .dc files: what `distill compress` did

    @property
    def image_size(self) -> int:
        return int(self.student.image_size)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "student": self.student.to_dict(), "classes": list(self.classes),
                "teachers": list(self.teachers), "metrics": dict(self.metrics), "config": dict(self.config),
                "label_map": self.label_map, "pruning": self.pruning, "weights": self.weights,
                "compression": self.compression}

    @classmethod
    def from_dict(cls, blob: dict) -> StudentFile:
        return cls(StudentConfig.from_dict(blob["student"]), list(blob["classes"]), list(blob.get("teachers") or []),
                   dict(blob.get("metrics") or {}), dict(blob.get("config") or {}), blob.get("label_map"),
                   blob.get("pruning"), blob.get("weights"), blob.get("compression"))


def remove_stale_temps(folder: str | os.PathLike, pattern: str = ".*.tmp") -> None:
    """Remove the temporary files that writers killed mid-write left in ``folder`` (those matching
    ``pattern``). atomic_save does it for its own file, but a resumed run may never write that file
    again (model.pt, kept only when an epoch is better), so a run removes them all when it starts.
    One writer per folder (rank 0)."""
    for stale in Path(folder).glob(pattern):
        stale.unlink(missing_ok=True)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash (or a full disk) mid-write leaves the previous file intact; a kill may leave a
    stray temporary file, which the next save removes. One writer per file (rank 0).
    """
    path = Path(path)
    # A temporary file of an earlier writer that was killed mid-write: never trusted, removed.
    remove_stale_temps(path.parent, f".{path.name}.*.tmp")
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


def save_student(path, model: torch.nn.Module, meta: StudentFile | dict) -> None:
    """Write ``model.pt``: the weights and ``meta`` (a :class:`StudentFile`, or the dict of the
    layout above without state_dict)."""
    module = getattr(model, "module", model)  # unwrap DDP / compiled wrappers
    module = getattr(module, "_orig_mod", module)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    blob = meta.to_dict() if isinstance(meta, StudentFile) else {"format": FORMAT, **meta}
    atomic_save({**blob, "state_dict": state}, path)


def read_student(path: str | os.PathLike) -> dict:
    """The raw contents of a ``model.pt`` (or of the ``model.pt`` inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise DistillError(f"no student at {path}: pass the run folder written by `distill train`")
    if codec.is_compressed(path):
        try:
            state, blob = codec.read(path)
        except (ValueError, OSError) as e:
            raise DistillError(str(e)) from None
        blob = {**blob, "state_dict": state}
    else:
        blob = _torch_student(path)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise DistillError(f"{path} is not a distill student file (format {FORMAT})")
    return blob


def _torch_student(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read {path} ({type(e).__name__}); is it a distill model.pt or .dc file?") from None


def open_student(path: str | os.PathLike) -> tuple[torch.nn.Module, StudentFile]:
    """(model in eval mode on CPU, its :class:`StudentFile`) from a run folder or ``model.pt``."""
    blob = read_student(path)
    meta = StudentFile.from_dict(blob)
    s = meta.student
    model = create_student(s.name, num_classes=s.num_classes, width=s.width, image_size=s.image_size)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), meta
