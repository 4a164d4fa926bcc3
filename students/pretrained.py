"""Where a student's first weights come from: an ``init`` file, the torch/Hugging Face caches, or
a download, per ``--pretrained auto|on|off``; :class:`Weights` says which, and how to feed them.

``auto`` (the default) takes ImageNet weights whenever they can be had and otherwise starts from
random init with a one-line ``note`` saying how to get them; ``on`` fails instead; ``off`` never
looks. ``DISTILL_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` limits ``auto``/``on`` to the caches.
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

MODES = ("auto", "on", "off")
# ImageNet statistics: what torchvision's and timm's ImageNet weights (and random init) expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """The provenance of a student's initial weights, and the input normalisation they expect."""

    source: str  # "random", "init:PATH", "torchvision:NAME", "timm:NAME"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    note: str | None = None  # why ``auto`` fell back to random init, and how to get weights

    @property
    def pretrained(self) -> bool:
        return self.source != "random"

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}


RANDOM = Weights("random")


def mode_of(pretrained: bool | str) -> str:
    """``True``/``False`` (the library's older flag) or a mode name -> a mode; ValueError otherwise."""
    if isinstance(pretrained, bool):
        return "on" if pretrained else "off"
    if pretrained not in MODES:
        raise ValueError(f"pretrained must be one of {', '.join(MODES)}, got {pretrained!r}")
    return pretrained


def offline(host: str | None = None) -> bool:
    """True when the user asked for no downloads (the caches are still read), or when ``host``
    cannot be reached in 3 s: huggingface_hub would otherwise retry for ~45 s per file first."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes") for v in ("DISTILL_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    if host is None:
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False


def normalisation(meta: dict | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from an init file, checked; None if it says nothing. Read from ``normalize``
    (an ImageNet weights file), else ``student`` (an earlier run's model.pt) or ``weights`` (its
    last.pt): a student started from an earlier run is fed as that run was."""
    meta = meta or {}
    norm = next((meta[k] for k in ("normalize", "student", "weights")
                 if isinstance(meta.get(k), dict) and "mean" in meta[k]), None)
    if norm is None:
        return None
    try:
        mean, std = tuple(float(x) for x in norm["mean"]), tuple(float(x) for x in norm["std"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"the init file's normalize must be {{'mean': [3 numbers], 'std': [3 numbers]}}, got {norm!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"the init file's normalize must hold 3 means and 3 positive stds, got {norm!r}")
    return mean, std


def torchvision_cached(url: str) -> Path | None:
    """The file torchvision's ``load_state_dict_from_url`` would reuse for ``url``, if present."""
    path = Path(torch.hub.get_dir(), "checkpoints", url.rsplit("/", 1)[-1])
    return path if path.is_file() else None


def timm_cached(name: str) -> str | None:
    """The Hugging Face cache file of timm model ``name``'s default pretrained weights, if present."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def cannot(what: str, mode: str, why: str, how: str | None = None) -> Weights:
    """``auto``: random init with a note; ``on``: the ValueError the user sees. ``how``: what
    to do instead (default: an init file, or a download while online)."""
    how = how or "no network: pass init=PATH (--init FILE), or run once online so the weights are cached"
    if mode == "on":
        raise ValueError(f"no ImageNet weights for {what}: {why}; {how}, or use --pretrained auto/off")
    return Weights("random", note=f"random init: no ImageNet weights for {what} ({why}); {how}")
