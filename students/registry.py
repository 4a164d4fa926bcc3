"""The student registry: names -> model factories, with timm as the fallback for any other name.

A factory is registered with ``@register_student("name")`` and called as
``factory(num_classes, width, image_size, pretrained, init)`` (``pretrained``: auto, on or off);
it returns an ``nn.Module`` mapping ``(N, 3, image_size, image_size)`` float32 to
``(N, num_classes)`` logits, or ``(module, Weights)`` to say where its weights came from and the
mean/std they expect (default: random init, STUDENT_MEAN/STUDENT_STD).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
from torch import nn

from .pretrained import (IMAGENET_MEAN, IMAGENET_STD, RANDOM, Weights, cannot, mode_of, normalisation, offline,
                         timm_cached)
from .weights import first_line, read_weights

# A student's input normalisation when its weights say nothing else (random init, torchvision and
# timm ImageNet weights); an init file may carry its own (Weights.mean/std), stored in StudentConfig.
STUDENT_MEAN = IMAGENET_MEAN
STUDENT_STD = IMAGENET_STD

# The user-facing ranges. SPEC: width 0.35-1.4, image size 96-224 nominal; 32-512 is accepted so
# tests can be fast and high-resolution experiments possible.
WIDTH_RANGE = (0.35, 1.4)
IMAGE_SIZE_RANGE = (32, 512)

# factory(num_classes, width, image_size, pretrained mode, init) -> model, or (model, Weights)
StudentFactory = Callable[[int, float, int, str, "str | None"], "nn.Module | tuple[nn.Module, Weights]"]
_REGISTRY: dict[str, StudentFactory] = {}


def register_student(name: str) -> Callable[[StudentFactory], StudentFactory]:
    """Decorator: make ``factory`` available to :func:`create_student` as ``name``."""

    def wrap(factory: StudentFactory) -> StudentFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def student_names() -> list[str]:
    """The registered names (timm names are accepted too but not listed: there are ~1,000)."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_student(
    name: str,
    num_classes: int,
    width: float = 1.0,
    image_size: int = 224,
    pretrained: bool | str = False,
    init: str | None = None,
) -> nn.Module:
    """The model of :func:`build_student`, without its provenance."""
    return build_student(name, num_classes, width, image_size, pretrained, init)[0]


def build_student(
    name: str,
    num_classes: int,
    width: float = 1.0,
    image_size: int = 224,
    pretrained: bool | str = "off",
    init: str | None = None,
) -> tuple[nn.Module, Weights]:
    """Build a student: a registered name, else any timm model name; with where its weights
    came from (:class:`Weights`, whose mean/std are the input normalisation they expect).

    width: channel multiplier alpha (registered students; timm names carry it in the name).
    image_size: input side in pixels; MobileNetV2 pools globally, so it sets cost, not shape.
    pretrained: ``auto``/``on``/``off`` (or True/False) ImageNet weights, see students.pretrained;
    init: a local weights file instead (an ImageNet state dict, or an earlier run's).
    Raises ValueError, echoing the bad value, for anything the caller must change.
    """
    _validate(num_classes, width, image_size)
    mode = mode_of(pretrained)
    _load_builtins()
    if name in _REGISTRY:
        built = _REGISTRY[name](num_classes, float(width), int(image_size), mode, init)
        # A plugin's factory may return the bare model: random init (or its init file, loaded).
        return built if isinstance(built, tuple) else (built, Weights(f"init:{init}") if init else RANDOM)
    import timm  # slow to import; only needed for the fallback

    if not timm.is_model(name):
        raise ValueError(
            f"unknown student {name!r}; registered: {', '.join(student_names())} "
            "(or any timm model name, see timm.list_models())"
        )
    if width != 1.0:
        raise ValueError(
            "width applies to registered students only; choose a timm name with the width "
            f"in it (e.g. mobilenetv3_small_050), got width={width}"
        )
    if init or mode == "off":
        model = timm.create_model(name, num_classes=num_classes)
        return model, (load_init(model, init) if init else RANDOM)
    return _timm_pretrained(name, num_classes, mode)


def _timm_pretrained(name: str, num_classes: int, mode: str) -> tuple[nn.Module, Weights]:
    """timm's default ImageNet weights of ``name``: from the Hugging Face cache, else downloaded."""
    import timm

    try:
        cached = timm_cached(name)
    except RuntimeError as e:  # timm: "Invalid pretrained tag" and the like
        raise ValueError(f"student {name}: {first_line(e)}") from None
    if cached is None and offline("huggingface.co"):
        return timm.create_model(name, num_classes=num_classes), cannot(name, mode, "not cached, and huggingface.co is off or out of reach")
    overlay = {"file": cached} if cached else None
    try:
        with torch.random.fork_rng(devices=[]):  # a failed attempt leaves the seeded RNG as it was
            model = timm.create_model(name, num_classes=num_classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # HF hub / URL errors come in many types
        weights = cannot(name, mode, f"cannot download them: {first_line(exc)}")
        return timm.create_model(name, num_classes=num_classes), weights
    cfg = model.pretrained_cfg
    return model, Weights(f"timm:{cfg.get('hf_hub_id') or name}", tuple(cfg["mean"]), tuple(cfg["std"]))


@dataclass
class StudentConfig:
    """Everything needed to rebuild a student and feed it: stored next to its weights."""

    name: str
    num_classes: int
    width: float = 1.0
    image_size: int = 224  # pixels, square input
    mean: tuple[float, float, float] = STUDENT_MEAN
    std: tuple[float, float, float] = STUDENT_STD
    hidden_channels: list[int] | None = None  # pruned MobileNetV2: the kept width of each block

    def to_dict(self) -> dict:
        """JSON-ready (tuples become lists)."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> StudentConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer files still load."""
        known = {f.name for f in fields(cls)}
        missing = {"name", "num_classes"} - set(data)
        if missing:
            lacking = ", ".join(sorted(missing))
            raise ValueError(f"student config lacks {lacking}, got keys {sorted(data)}")
        values = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        return cls(**values)

    def create(self, pretrained: bool | str = False, init: str | None = None) -> nn.Module:
        """The (untrained unless ``pretrained``/``init``) model this config describes."""
        return create_student(
            self.name, self.num_classes, self.width, self.image_size, pretrained, init
        )


def load_init(model: nn.Module, path: str) -> Weights:
    """Load a state dict from ``path`` into ``model``, skipping classifier tensors whose shape
    differs (ImageNet head -> our classes). Any other mismatch is a ValueError. Returns the
    provenance, with the file's own ``normalize`` (mean, std) when it carries one."""
    state, extras = read_weights(path, "init")
    norm = normalisation(extras)
    head = classifier_prefix(model)
    own = model.state_dict()
    differ = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    skipped = [k for k in differ if head and k.startswith(head)]
    wrong = [k for k in differ if k not in skipped]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"init={path} does not fit this model: {k} has shape {tuple(state[k].shape)}, "
            f"the model needs {tuple(own[k].shape)} ({len(wrong)} tensors differ; other width?)"
        )
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ValueError(
            f"init={path} does not fit this model: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return Weights(f"init:{path}", *norm) if norm else Weights(f"init:{path}")


def classifier_prefix(model: nn.Module) -> str:
    """Name prefix of the last Linear layer (``"classifier.1."``, ``"fc."``); "" if none."""
    last = ""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{name}."
    return last


def _validate(num_classes: int, width: float, image_size: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise ValueError(f"width must be a number, got {width!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(f"image size must be an integer number of pixels, got {image_size!r}")
    if not WIDTH_RANGE[0] <= width <= WIDTH_RANGE[1]:
        low, high = WIDTH_RANGE
        raise ValueError(f"width must be between {low} and {high}, got {width}")
    if not IMAGE_SIZE_RANGE[0] <= image_size <= IMAGE_SIZE_RANGE[1]:
        low, high = IMAGE_SIZE_RANGE
        raise ValueError(f"image size must be between {low} and {high} pixels, got {image_size}")


def _load_builtins() -> None:
    # Importing runs the @register_student decorators, as a plugin's import would.
    from . import mobilenetv1, mobilenetv2, pruned  # noqa: F401
