"""``distill compress``: deep compression of a student (Han et al. 2016): prune the smallest weights
of every layer, share the rest among 2^B centroids per layer (k-means), Huffman-code the cluster
indices and the gaps between kept weights, and write a ``.dc`` file that predict, eval and export
load back as a normal student (students/codec.py).

Each stage is sized as the paper's table sizes it and, when the student's training store can be
found, scored on the student's own validation split: the trainer's agreement with the teacher and
accuracy. ``epochs`` > 0 fine-tunes after pruning (pruned weights held at zero) and after sharing
(each centroid moved by the mean update of its weights, the paper's shared gradient), both on the
student's training split with its distillation loss.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from students import codec
from students.codec import Shared

from ..errors import DistillError
from ..training import dsd
from ..training.checkpoint import MODEL_FILE, StudentFile, open_student
from .finetune import FineTune, Progress, fine_tune, fine_tune_data, validate

log = logging.getLogger(__name__)

KMEANS_ITERATIONS = 30


@dataclass
class CompressConfig:
    """The flags of ``distill compress``."""

    student: str  # run folder or model.pt
    bits: int = 5  # 2^bits shared values per layer
    sparsity: float = 0.5  # fraction of each layer's weights pruned first (0: share only)
    epochs: int = 0  # fine-tuning epochs after pruning and after sharing (needs the training store)
    out: str | None = None  # default: model.dc in the run folder (or next to model.pt)
    images: str | None = None  # default: the student's training images
    db: str | None = None  # default: the student's training store
    batch_size: int = 64
    lr: float = 5e-4  # peak AdamW learning rate of each fine-tuning (cosine): the weights are trained
    device: str = "auto"
    seed: int = 0


def check_config(cfg: CompressConfig) -> None:
    checks = [
        (1 <= cfg.bits <= 8, f"--bits must be between 1 and 8, got {cfg.bits}"),
        (0 <= cfg.sparsity < 1, f"--sparsity must be in [0, 1), got {cfg.sparsity}"),
        (cfg.epochs >= 0, f"--epochs must be >= 0, got {cfg.epochs}"),
        (cfg.batch_size >= 2, f"--batch-size must be at least 2 (batch norm), got {cfg.batch_size}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


def depthwise_kernels(model: nn.Module) -> set[str]:
    """Depthwise conv kernels, which pruning leaves whole (they are shared and coded like the rest).
    Each holds 9 taps per channel and ~3% of a MobileNetV2's weights; measured on the Imagenette
    x0.5 student (4,000 calls, its validation split, no fine-tuning): 30% of every layer pruned
    kept 34% agreement, 30% of all but the depthwise kernels 42% (unpruned 55%)."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels}


# -- weight sharing ---------------------------------------------------------------------------


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = KMEANS_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k,), cluster of each value) by Lloyd's algorithm on a line, started from k
    values spread evenly between the min and the max (the paper's linear initialisation, which
    keeps centroids on the few large weights that matter most). Written here rather than taken
    from scikit-learn: in one dimension an assignment is a ``bucketize`` on the midpoints, and
    sklearn's KMeans would be a dependency for these few lines."""
    values = values.float()
    low, high = values.min(), values.max()
    centroids = torch.linspace(float(low), float(high), k) if k > 1 else values.mean().reshape(1)
    for _ in range(iterations):
        order = centroids.sort().values
        assign = torch.bucketize(values, (order[1:] + order[:-1]) / 2)
        new = centroid_means(values, assign, order)
        if torch.allclose(new, order):
            centroids = new
            break
        centroids = new
    order = centroids.sort().values
    return order, torch.bucketize(values, (order[1:] + order[:-1]) / 2)


def centroid_means(values: torch.Tensor, assign: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each cluster's mean of ``values`` (``assign``: the cluster of each); an empty cluster keeps
    its centroid. Lloyd's update step, and the shared weights' update after an optimizer step."""
    k = centroids.numel()
    sums = torch.zeros(k, device=values.device).scatter_add_(0, assign, values)
    counts = torch.zeros(k, device=values.device).scatter_add_(0, assign, torch.ones_like(values))
    return torch.where(counts > 0, sums / counts.clamp_min(1), centroids)


def share(weight: torch.Tensor, bits: int) -> Shared:
    """The nonzero weights of ``weight`` clustered into 2^bits values; zeros stay pruned."""
    flat = weight.detach().float().cpu().flatten()
    kept = flat != 0
    index = torch.full(flat.shape, -1, dtype=torch.int64)
    if kept.any():
        codebook, assign = kmeans_1d(flat[kept], min(2**bits, int(kept.sum())))
        index[kept] = assign
    else:
        codebook = torch.zeros(1)
    return Shared(codebook, index.view(weight.shape))


@torch.no_grad()
def apply_shared(model: nn.Module, shared: dict[str, Shared]) -> None:
    """Set each shared weight to its codebook values, and every other float tensor to what the
    file will hold (float16), so the model in memory is the one the file decodes to."""
    params = dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        if name in shared:
            params[name].copy_(shared[name].tensor())
        elif tensor.is_floating_point():
            tensor.copy_(codec.stored_dense(tensor))


def kept_clusters(shared: dict[str, Shared], device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per shared weight: (flat positions of the kept weights, their clusters) on ``device``, made
    once for :func:`reshare`, which runs after every optimizer step."""
    out = {}
    for name, s in shared.items():
        flat = s.index.flatten()
        where = torch.nonzero(flat >= 0).flatten()
        out[name] = (where.to(device), flat[where].to(device))
    return out


@torch.no_grad()
def reshare(model: nn.Module, shared: dict[str, Shared],
            kept: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """After an optimizer step: each centroid becomes the mean of its weights (moved by the step),
    and every weight its centroid again; pruned weights stay zero. With plain SGD this is the
    paper's centroid update by the summed gradient, up to the step size. ``kept``: from
    :func:`kept_clusters` (made here if not given)."""
    params = dict(model.named_parameters())
    kept = kept or kept_clusters(shared, next(iter(params.values())).device)
    for name, (where, assign) in kept.items():
        weight = params[name]
        values = weight.detach().flatten()[where].float()
        codebook = centroid_means(values, assign, shared[name].codebook.to(values.device))
        shared[name].codebook = codebook  # on the model's device until fine-tuning ends: no sync per step
        flat = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
        flat[where] = codebook[assign].to(weight.dtype)
        weight.copy_(flat.view(weight.shape))


# -- the whole job ----------------------------------------------------------------------------


def compress_student(cfg: CompressConfig, progress: Progress | None = None) -> dict:
    """Prune, share, code; write the ``.dc`` file; returns the table of the stages."""
    check_config(cfg)
    original, meta = open_student(cfg.student)
    out = resolve_out(cfg)
    ft = _data(cfg, meta)
    device = ft.ranks.device if ft else torch.device("cpu")
    model = copy.deepcopy(original).to(device)
    score = functools.partial(_score, ft=ft, student=meta.student)
    state = {k: v.cpu() for k, v in original.state_dict().items()}
    stages = [{"stage": "fp32", "bytes": sum(t.numel() * t.element_size() for t in state.values()), **score(model)}]

    weights = dsd.prunable(model)
    if cfg.sparsity > 0:
        masks = {name: mask for name, mask in dsd.magnitude_masks(model, cfg.sparsity).items()
                 if name not in depthwise_kernels(model)}
        dsd.apply_masks(model, masks)
        tuned = _tune(model, ft, meta, cfg, 1, functools.partial(dsd.apply_masks, masks=masks), progress)
        pruned = {name: Shared(torch.zeros(1), torch.where(w.detach().cpu() != 0, 0, -1)) for name, w in weights.items()}
        stages.append({"stage": f"pruned {cfg.sparsity:.0%}", "bytes": codec.stage_bytes(state, pruned, None),
                       "fine_tuned_epochs": tuned, **score(model)})

    shared = {name: share(w, cfg.bits) for name, w in weights.items()}
    apply_shared(model, shared)
    kept = kept_clusters(shared, device)
    tuned = _tune(model, ft, meta, cfg, 2, functools.partial(reshare, shared=shared, kept=kept), progress)
    if tuned:  # fine-tuning moved BN statistics and biases: back to what the file holds
        for s in shared.values():
            s.codebook = s.codebook.cpu()
        apply_shared(model, shared)
    stages.append({"stage": f"shared {cfg.bits}-bit", "bytes": codec.stage_bytes(state, shared, cfg.bits),
                   "fine_tuned_epochs": tuned, **score(model)})

    model = model.cpu().eval()
    new_meta = replace(meta, compression={"from": str(cfg.student), "config": asdict(cfg)})
    size = codec.write(out, {k: v.cpu() for k, v in model.state_dict().items()}, shared, new_meta.to_dict())
    decoded, _ = open_student(out)
    same = _same_predictions(model, decoded, meta.image_size)
    stages.append({"stage": "Huffman (the file)", "bytes": size, **score(decoded.to(device))})
    for s in stages:
        s["ratio"] = round(stages[0]["bytes"] / s["bytes"], 2)
    return {"out": str(out), "student": str(cfg.student), "bits": cfg.bits, "sparsity": cfg.sparsity,
            "epochs": cfg.epochs, "stages": stages, "decoded_max_abs_diff": same,
            "model_pt_bytes": _model_pt_bytes(cfg.student), "file_bytes": size,
            "val_images": int(ft.data.is_val.sum()) if ft else None}


def resolve_out(cfg: CompressConfig) -> Path:
    """--out, else ``model.dc`` beside the student's model.pt."""
    if cfg.out:
        return Path(cfg.out)
    path = Path(cfg.student)
    return (path if path.is_dir() else path.parent) / "model.dc"


def _data(cfg: CompressConfig, meta: StudentFile) -> FineTune | None:
    """The student's training split, for scoring and fine-tuning; None (sizes only) when its
    store cannot be had and no fine-tuning was asked for."""
    try:
        return fine_tune_data(meta, cfg.student, images=cfg.images, db=cfg.db, epochs=max(cfg.epochs, 1),
                              batch_size=cfg.batch_size, lr=cfg.lr, device=cfg.device, seed=cfg.seed)
    except DistillError as e:
        if cfg.epochs:
            raise
        log.warning("no accuracy per stage (%s); sizes only: pass --images and --db to score them", e)
        return None


def _tune(model: nn.Module, ft: FineTune | None, meta: StudentFile, cfg: CompressConfig, step: int,
          after_step, progress: Progress | None) -> int:
    if not cfg.epochs or ft is None:
        return 0
    model.to(ft.ranks.device)
    fine_tune(model, ft, meta.student, step, progress, after_step=after_step)
    return cfg.epochs


def _score(model: nn.Module, ft: FineTune | None, student) -> dict:
    if ft is None:
        return {"val_accuracy": None, "val_agreement": None}
    metrics = validate(ft.run(model, student))
    return {k: metrics[k] for k in ("val_accuracy", "val_agreement")}


@torch.no_grad()
def _same_predictions(a: nn.Module, b: nn.Module, image_size: int) -> float:
    """Largest logit difference between the model in memory and the file's, on random inputs."""
    x = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return float((a.eval()(x) - b.eval()(x)).abs().max())


def _model_pt_bytes(student: str) -> int | None:
    path = Path(student)
    path = path / MODEL_FILE if path.is_dir() else path
    return path.stat().st_size if path.exists() else None
