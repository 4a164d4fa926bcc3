"""Measuring how fast a model runs on the CPU: a model ready to run (:class:`Candidate`: PyTorch,
TorchScript or onnxruntime), latency of one model, and latency of several measured interleaved
(each round times every model once, so a shared machine's noise hits all alike).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import DistillError

# What an exported file's metadata says it is (written by export, read back by predict).
EXPORT_FORMAT = "distill-export/1"


@dataclass
class LatencyOptions:
    """How CPU latency is measured: ``warmup`` untimed runs, then the median of ``runs``."""

    batch: int = 32  # the batched measurement (the batch-1 one is always made)
    runs: int = 10
    warmup: int = 3


@dataclass
class Candidate:
    """A runnable model: ``predict`` maps (B, 3, S, S) float32 normalised input to (B, C) logits."""

    name: str
    predict: Callable[[np.ndarray], np.ndarray]
    image_size: int
    file_bytes: int | None = None
    path: Path | None = None  # the file it was loaded from, if any


def torch_candidate(name: str, module, image_size: int, file_bytes: int | None = None) -> Candidate:
    """An ``nn.Module`` or ScriptModule, run under ``inference_mode`` on the CPU."""
    module.eval()

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return Candidate(name, predict, image_size, file_bytes)


def onnx_candidate(name: str, path: str | Path, image_size: int, threads: int) -> Candidate:
    """An ONNX file run by onnxruntime's CPU provider with ``threads`` intra-op threads."""
    session = onnx_session(path, threads)
    input_name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: x})[0]

    return Candidate(name, predict, image_size, Path(path).stat().st_size, Path(path))


def require_onnx() -> None:
    """onnx and onnxruntime are an optional extra: say how to get them before any work is done."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise DistillError(f"ONNX export needs {' and '.join(missing)}: pip install 'distill[export]' "
                           "(or use --format torchscript)")


def onnx_session(path: str | Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about hardware-specific fusions are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch intra-op threads set to ``n`` for the block (onnxruntime gets it per session)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def interleaved_latency(candidates: list[Candidate], batches=(1, 32), runs: int = 10,
                        warmup: int = 2) -> dict[str, dict]:
    """name -> {"ms_batch<B>": median ms per forward pass} on random input, CPU.

    Each round times every candidate once, in turn, so load from other processes (a shared
    machine) slows all of them alike and the ratios stay meaningful.
    """
    rng = np.random.default_rng(0)
    out: dict[str, dict] = {c.name: {} for c in candidates}
    for batch in batches:
        inputs = {c.name: rng.standard_normal((batch, 3, c.image_size, c.image_size), dtype=np.float32)
                  for c in candidates}
        times: dict[str, list[float]] = {c.name: [] for c in candidates}
        for round_ in range(warmup + runs):
            for c in candidates:
                start = time.perf_counter()
                c.predict(inputs[c.name])
                if round_ >= warmup:
                    times[c.name].append((time.perf_counter() - start) * 1000.0)
        for c in candidates:
            out[c.name][f"ms_batch{batch}"] = round(statistics.median(times[c.name]), 3)
    return out


def latency_ms(model: torch.nn.Module, image_size: int, options: LatencyOptions) -> tuple[float, float]:
    """(median ms at batch 1, median ms per batch of ``options.batch``) of one PyTorch model."""
    ms = interleaved_latency([torch_candidate("model", model, image_size)], (1, options.batch),
                             options.runs, options.warmup)["model"]
    return ms["ms_batch1"], ms[f"ms_batch{options.batch}"]


def student_latency(model: torch.nn.Module, image_size: int, options: LatencyOptions) -> dict:
    """CPU latency at batch 1 (ms per image) and at ``options.batch`` (ms per batch)."""
    batch1, batched = latency_ms(model, image_size, options)
    return {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "runs": options.runs,
        "ms_per_image_batch1": round(batch1, 3),
        "batch": options.batch,
        "ms_per_batch": round(batched, 3),
        "ms_per_image_batched": round(batched / options.batch, 3),
        "teacher": None,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 2 places (a speed-up, a size ratio); None when it has no value."""
    if a is None or not b or not math.isfinite(a / b):
        return None
    return round(a / b, 2)
