"""Images scored by a model, for the selection strategies that need one (select.py).

Per image: the predictive entropy and the margin (top-1 minus top-2 probability) of the model's
softmax, and its embedding: the input of the model's last Linear layer (the global-pooled
penultimate features, before the classifier; dropout is off in eval), scaled to unit length.
The model is a trained student (``--selector RUN``: a run folder or ``model.pt``), fed exactly
as in training and eval (shorter side to its input size, centre crop, ``to_input`` with its own
mean/std), or else the local EfficientNet-Lite0 teacher with its own timm preprocessing (free to
run, and its features know far more of the world than an untrained student's).

Scores are cached on disk, per model, under ``$DISTILL_CACHE_DIR/scores-<fingerprint>/``: the
fingerprint hashes the weights and the preprocessing, so a retrained student is another model,
and a rerun (the next day's harvest, a second strategy) computes only the images it has not
seen. The cache is ``.npz`` chunk files (sha256, float16 embeddings, entropy, margin), written
every ``CHUNK_IMAGES`` images so a killed run keeps what it computed, each written atomically,
merged when more than ``MAX_CHUNK_FILES`` pile up; any file may be deleted at will. Not the
store: 100,000 embeddings of 1,280 dimensions are 250 MB that the answers database (the one
file worth backing up) should not carry, and they are only worth anything to this one model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.images import decode_rgb, sha256_bytes
from ..data.pixels import cache_dir, resize_center_crop, to_input
from ..device import resolve_device
from ..errors import DistillError
from ..teachers import TeacherOptions, create_teacher
from ..training.checkpoint import open_student

log = logging.getLogger("distill.harvest")

SCORES_VERSION = "1"  # bump when what is stored per image changes meaning
CHUNK_IMAGES = 4096
MAX_CHUNK_FILES = 32


@dataclass
class Scores:
    """The scores of the images asked for that could be read, in the order asked."""

    shas: list[str]
    embeddings: torch.Tensor  # (N, D) float32, rows of unit length
    entropy: torch.Tensor  # (N,) nats
    margin: torch.Tensor  # (N,) top-1 minus top-2 probability
    failed: list[str] = field(default_factory=list)  # unreadable now (changed or gone since the scan)
    computed: int = 0  # run through the model in this call; the rest came from the cache


@dataclass
class _Chunk:
    shas: list[str]
    embeddings: np.ndarray  # (n, D) float16
    entropy: np.ndarray  # (n,) float32
    margin: np.ndarray  # (n,) float32


class Scorer:
    """One model, opened once: the student at ``selector``, or the local teacher when None."""

    def __init__(self, selector: str | None, device: str = "auto", batch_size: int = 32):
        self.device = resolve_device(device)
        self.batch_size = max(1, batch_size)
        if selector:
            model, meta = open_student(selector)
            s = meta.student
            size, mean, std = meta.image_size, tuple(s.mean), tuple(s.std)
            self.name = f"student {selector}"
            self._prepare: Callable = lambda image: resize_center_crop(image, size)
            # uint8 pixels go to the device, 4x less to copy than floats; normalised there.
            self._batch: Callable = lambda items: to_input(torch.from_numpy(np.stack(items)).to(self.device),
                                                           mean, std)
            preprocessing = {"kind": "student", "image_size": size, "mean": mean, "std": std}
            self.model = model.to(self.device)
        else:
            teacher = create_teacher("local", TeacherOptions(device=str(self.device), batch_size=self.batch_size))
            teacher.load()
            self.name = f"teacher {teacher.spec}"
            self._prepare = teacher.transform  # PIL -> normalised (3, H, W) float tensor
            self._batch = lambda items: torch.stack(items).to(self.device)
            preprocessing = {"kind": "teacher", "spec": teacher.spec, "data_config": teacher.data_config}
            self.model = teacher.model
        self.model.eval()
        self._features: list[torch.Tensor] = []
        _last_linear(self.model, self.name).register_forward_pre_hook(
            lambda _module, args: self._features.append(args[0]))
        self.fingerprint = fingerprint(self.model, preprocessing)
        self.folder = cache_dir() / f"scores-{self.fingerprint}"

    def score(self, shas: list[str], paths: dict[str, str]) -> Scores:
        """Scores of ``shas`` (``paths``: sha256 -> a file with those bytes), from the cache
        where it has them, from the model (in batches, then cached) where not."""
        chunks, index = _read_cache(self.folder, set(shas))
        todo = [sha for sha in dict.fromkeys(shas) if sha not in index]
        failed: set[str] = set()
        if todo:
            start = time.monotonic()
            for chunk, bad in self._compute(todo, paths):
                failed |= bad
                if chunk is not None:
                    index.update({sha: (len(chunks), row) for row, sha in enumerate(chunk.shas)})
                    chunks.append(chunk)
            log.info("scored %d images with %s in %.1fs", len(todo) - len(failed), self.name,
                     time.monotonic() - start)
            _merge_if_many(self.folder)
        ok = [sha for sha in shas if sha in index]
        dims = chunks[0].embeddings.shape[1] if chunks else 0
        emb = np.empty((len(ok), dims), np.float16)
        entropy, margin = np.empty(len(ok), np.float32), np.empty(len(ok), np.float32)
        by_chunk: dict[int, tuple[list[int], list[int]]] = {}
        for pos, sha in enumerate(ok):
            c, row = index[sha]
            by_chunk.setdefault(c, ([], []))[0].append(pos)
            by_chunk[c][1].append(row)
        for c, (pos, rows) in by_chunk.items():
            emb[pos], entropy[pos], margin[pos] = (chunks[c].embeddings[rows], chunks[c].entropy[rows],
                                                   chunks[c].margin[rows])
        return Scores(ok, torch.from_numpy(emb).float(), torch.from_numpy(entropy), torch.from_numpy(margin),
                      [sha for sha in shas if sha in failed], len(todo) - len(failed))

    def _compute(self, todo: list[str], paths: dict[str, str]) -> Iterator[tuple[_Chunk | None, set[str]]]:
        """Yields (the chunk just written to the cache, or None when nothing could be read; the
        shas that could not be) every CHUNK_IMAGES images. Decoding the next batch (threads: PIL
        releases the GIL) overlaps the model's pass over this one."""
        batches = [todo[i:i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        rows: list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        done, bad = 0, set()
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            def submit(batch: list[str]) -> list:
                return [pool.submit(self._decode, sha, paths[sha]) for sha in batch]

            pending = submit(batches[0]) if batches else []
            for i, batch in enumerate(batches):
                items = [f.result() for f in pending]
                if i + 1 < len(batches):
                    pending = submit(batches[i + 1])
                good = [(sha, item) for sha, item in zip(batch, items) if item is not None]
                bad |= {sha for sha, item in zip(batch, items) if item is None}
                if good:
                    rows.append(([sha for sha, _ in good], *self._forward([item for _, item in good])))
                done += len(batch)
                if done >= CHUNK_IMAGES or i + 1 == len(batches):
                    yield (_write_chunk(self.folder, rows) if rows else None), bad
                    rows, done, bad = [], 0, set()

    def _decode(self, sha: str, path: str):
        """The model's input for one image, or None when the file cannot be read or decoded now
        (or no longer holds the bytes it was scanned with): skipped, as the scan skips them."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            if sha256_bytes(data) != sha:
                return None
            return self._prepare(decode_rgb(data))
        except (OSError, ValueError):
            return None

    def _forward(self, items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings (n, D) float16, entropy (n,), margin (n,)) on the CPU, for one batch."""
        with torch.inference_mode():
            self._features.clear()
            logits = _logits(self.model(self._batch(items))).float()
            feats = torch.nn.functional.normalize(self._features.pop().flatten(1).float(), dim=1)
            probs = torch.softmax(logits, dim=1)
            entropy = torch.special.entr(probs).sum(dim=1)
            top = probs.topk(min(2, probs.shape[1]), dim=1).values
            margin = top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.ones_like(top[:, 0])
        return feats.half().cpu(), entropy.cpu(), margin.cpu()


def fingerprint(model: torch.nn.Module, preprocessing: dict) -> str:
    """A hash of the weights (names, shapes, bytes) and the preprocessing: the cache key."""
    h = hashlib.sha256(json.dumps({"version": SCORES_VERSION, **preprocessing}, sort_keys=True,
                                  default=str).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _last_linear(model: torch.nn.Module, name: str) -> torch.nn.Module:
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    if last is None:
        raise DistillError(f"{name} has no Linear classifier layer to take its features before")
    return last


def _logits(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):  # some timm models return (logits, aux)
        out = out[0]
    return out


def _write_chunk(folder: Path, rows: list) -> _Chunk:
    chunk = _Chunk([sha for r in rows for sha in r[0]], torch.cat([r[1] for r in rows]).numpy(),
                   torch.cat([r[2] for r in rows]).numpy(), torch.cat([r[3] for r in rows]).numpy())
    _save(folder, chunk)
    return chunk


def _save(folder: Path, chunk: _Chunk) -> None:
    """One new chunk file, atomically: a killed write leaves only a stray .tmp."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, shas=np.array(chunk.shas, dtype="U64"), embeddings=chunk.embeddings,
                     entropy=chunk.entropy, margin=chunk.margin)
        os.replace(tmp, folder / f"{uuid.uuid4().hex}.npz")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(folder: Path, wanted: set[str] | None) -> tuple[list[_Chunk], dict[str, tuple[int, int]]]:
    """The chunks holding any of ``wanted`` (None: all), and sha256 -> (chunk, row)."""
    chunks: list[_Chunk] = []
    index: dict[str, tuple[int, int]] = {}
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        try:
            with np.load(path) as z:
                shas = z["shas"].tolist()
                rows = {sha: row for row, sha in enumerate(shas) if wanted is None or sha in wanted}
                if not rows:
                    continue
                chunk = _Chunk(shas, z["embeddings"], z["entropy"], z["margin"])
        except FileNotFoundError:  # merged away by another harvester meanwhile
            continue
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            path.unlink(missing_ok=True)  # a damaged cache file is recomputed, never trusted
            continue
        index.update({sha: (len(chunks), row) for sha, row in rows.items()})
        chunks.append(chunk)
    return chunks, index


def _merge_if_many(folder: Path) -> None:
    """Many small chunk files (one per run at least) become one, so reading stays one pass."""
    files = sorted(folder.glob("*.npz"))
    if len(files) <= MAX_CHUNK_FILES:
        return
    chunks, _ = _read_cache(folder, None)
    if chunks:
        shas = np.array([sha for c in chunks for sha in c.shas], dtype="U64")
        _, first = np.unique(shas, return_index=True)  # an image scored by two harvesters: once
        _save(folder, _Chunk(shas[first].tolist(), np.concatenate([c.embeddings for c in chunks])[first],
                             np.concatenate([c.entropy for c in chunks])[first],
                             np.concatenate([c.margin for c in chunks])[first]))
    for path in files:
        path.unlink(missing_ok=True)
