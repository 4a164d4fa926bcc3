"""Use a student: its top-k classes and probabilities for every image, from a run folder
(PyTorch) or an exported ONNX file (onnxruntime), with the same decoding and preprocessing as
training. The ONNX file brings its classes and preprocessing in its own metadata, so a deployed
model and the run folder it came from answer alike.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..data.images import ImageFile, Skip, decode_rgb, display_path, read, scan, sha256_bytes
from ..data.pixels import resize_center_crop, to_input
from ..device import resolve_device
from ..errors import DistillError
from ..training.checkpoint import open_student
from .measure import EXPORT_FORMAT, onnx_session, require_onnx


@dataclass
class Predictor:
    """A student ready to answer: ``logits`` maps (B, S, S, 3) uint8 pixels to (B, C) logits."""

    classes: list[str]
    image_size: int
    logits: Callable[[np.ndarray], np.ndarray]
    source: str  # "pytorch" or "onnxruntime"


def load_predictor(student: str | os.PathLike, device: str = "auto", threads: int | None = None) -> Predictor:
    """A run folder or ``model.pt`` (PyTorch on ``device``), or a ``.onnx`` export (CPU)."""
    path = Path(student)
    if path.suffix == ".onnx":
        return _onnx_predictor(path, threads)
    model, meta = open_student(path)
    dev = resolve_device(device)
    model = model.to(dev, memory_format=torch.channels_last)
    mean, std = meta.student.mean, meta.student.std

    def logits(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = to_input(torch.from_numpy(pixels).to(dev), mean, std)
            return model(x).float().cpu().numpy()

    return Predictor(list(meta.classes), meta.image_size, logits, "pytorch")


def _onnx_predictor(path: Path, threads: int | None) -> Predictor:
    require_onnx()
    if not path.is_file():
        raise DistillError(f"no ONNX file at {path}: pass a run folder or the file `distill export` wrote")
    try:
        session = onnx_session(path, threads or torch.get_num_threads())
        record = json.loads(session.get_modelmeta().custom_metadata_map.get("distill", "{}"))
    except Exception as e:  # onnxruntime raises its own types for a file that is not ONNX
        raise DistillError(f"cannot load {path} as ONNX ({type(e).__name__}): is it a `distill export` file?") from None
    if record.get("format") != EXPORT_FORMAT:
        raise DistillError(f"{path} has no distill metadata (classes, preprocessing): export it with `distill export`")
    pre = record["preprocessing"]
    input_name = session.get_inputs()[0].name

    def logits(pixels: np.ndarray) -> np.ndarray:
        x = to_input(torch.from_numpy(pixels), pre["mean"], pre["std"]).contiguous().numpy()
        return session.run(None, {input_name: x})[0]

    return Predictor(list(record["classes"]), int(pre["image_size"]), logits, "onnxruntime")


def image_files(inputs: list[str]) -> tuple[list[ImageFile], list[Skip]]:
    """Every image under the folders and every file named, in the order given (folders scanned
    recursively and sorted); a missing path is a DistillError before anything runs."""
    files, skips = [], []
    for item in inputs:
        if os.path.isdir(item):
            found, skipped = scan(item)
            files += found
            skips += skipped
        elif os.path.isfile(item):
            files.append(ImageFile(item, None))
        else:
            raise DistillError(f"--images {display_path(item)!r} is neither a file nor a folder")
    return files, skips


def predict(predictor: Predictor, files: list[ImageFile], top_k: int = 5, batch_size: int = 32,
            progress: Callable[[int, int], None] | None = None) -> Iterator[dict]:
    """One dict per file, in the order given: ``{"path", "sha256", "top": [{"class", "probability"},
    ...]}``, or ``{"path", "error"}`` for a file that cannot be decoded (skipped; nothing stops).

    Each batch's files are read and decoded on threads (PIL releases the GIL while decoding), so
    the forward pass, not JPEG decoding, sets the pace.
    """
    k = min(top_k, len(predictor.classes))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            decoded = list(pool.map(partial(_decode, size=predictor.image_size), files[start:start + batch_size]))
            rows = [row for row, _ in decoded]
            _answer(predictor, [row for row, px in decoded if px is not None],
                    [px for _, px in decoded if px is not None], k)
            yield from rows
            if progress:
                progress(min(start + batch_size, len(files)), len(files))


def _decode(file: ImageFile, size: int) -> tuple[dict, np.ndarray | None]:
    """(the row, its pixels) or (the row with the reason it cannot be used, None); one decode."""
    row = {"path": display_path(file.path)}
    data = read(file)
    if isinstance(data, Skip):
        return {**row, "error": data.reason}, None
    try:
        image = decode_rgb(data)  # refuses bombs and truncated files with a reason, as load() does
    except ValueError as e:
        return {**row, "error": str(e)}, None
    return {**row, "sha256": sha256_bytes(data)}, resize_center_crop(image, size)


def _answer(predictor: Predictor, rows: list[dict], pixels: list[np.ndarray], k: int) -> None:
    """Fill in ``rows[i]["top"]`` from one forward pass over ``pixels``."""
    if not rows:
        return
    probs = torch.softmax(torch.from_numpy(predictor.logits(np.stack(pixels))).float(), dim=1)
    values, indices = probs.topk(k, dim=1)
    for row, vals, idx in zip(rows, values.tolist(), indices.tolist()):
        row["top"] = [{"class": predictor.classes[i], "probability": round(v, 6)} for v, i in zip(vals, idx)]


def summarize(rows: list[dict], skipped: list[Skip], seconds: float, predictor: Predictor) -> dict:
    """Counts (predicted, failed by reason, skipped file types), time and throughput."""
    failed: dict[str, int] = {}
    for r in rows:
        if "error" in r:
            failed[r["error"]] = failed.get(r["error"], 0) + 1
    predicted = sum(1 for r in rows if "top" in r)
    return {"summary": True, "predicted": predicted, "failed": sum(failed.values()), "failed_by_reason": failed,
            "skipped_files": len(skipped), "runtime": predictor.source, "seconds": round(seconds, 2),
            "images_per_s": round(predicted / seconds, 1) if seconds > 0 else None}


def run_predict(student: str, inputs: list[str], top_k: int = 5, batch_size: int = 32, device: str = "auto",
                progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], dict]:
    """(one row per image, the summary): what ``distill predict`` prints."""
    if top_k < 1 or batch_size < 1:
        raise DistillError(f"--top-k and --batch-size must be at least 1, got {top_k} and {batch_size}")
    files, skipped = image_files(inputs)
    predictor = load_predictor(student, device)
    started = time.perf_counter()
    rows = list(predict(predictor, files, top_k, batch_size, progress))
    return rows, summarize(rows, skipped, time.perf_counter() - started, predictor)
