"""Export a student for deployment: ONNX (checked against PyTorch with onnxruntime) or
TorchScript, optionally int8 by post-training static quantization calibrated on real images.

Every exported file carries what a deployment needs besides the weights: the class names and
the preprocessing (ONNX ``metadata_props``; TorchScript ``config.json`` in ``_extra_files``).
The side-by-side comparison of fp32 and int8 (accuracy, agreement, latency measured
interleaved by :mod:`.measure`) is here too.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache import default_db_path, open_store

from ..training.checkpoint import StudentFile, open_student
from .measure import (EXPORT_FORMAT, Candidate, interleaved_latency, onnx_candidate, ratio, require_onnx, torch_candidate,
                      torch_threads)
from ..errors import DistillError
from ..data.images import list_images
from ..data.pixels import load_pixels, to_input
from ..data.targets import folder_classes
from ..teachers.spec import first_teacher

FORMATS = ("onnx", "torchscript")
OPSET = 17
MAX_ABS_DIFF = 1e-3  # fp32 export vs PyTorch, on logits
RESIZE = "shorter side to image_size (bicubic), centre crop, EXIF orientation applied"


@dataclass
class ExportConfig:
    """The flags of ``distill export``."""

    student: str  # run folder or model.pt
    format: str = "onnx"  # onnx | torchscript
    out: str | None = None  # default: <run>/model[.int8].onnx or model[.int8].torchscript.pt
    int8: bool = False
    calib_images: str | None = None  # default: the teacher's harvested images (training folder first)
    images: str | None = None  # labelled images to compare fp32 and int8 on (default: the calibration ones)
    db: str | None = None  # the store with the harvested images (default: $DISTILL_DB or ./distill.db)
    calib_count: int = 128  # calibration images (evenly spaced over the available ones)
    threads: int | None = None  # CPU threads for latency (default: torch.get_num_threads())
    latency_runs: int = 10
    latency_batch: int = 32


def check_config(cfg: ExportConfig) -> None:
    checks = [
        (cfg.format in FORMATS, f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}"),
        (cfg.calib_count >= 1, f"calibration needs at least 1 image, got {cfg.calib_count}"),
        (cfg.threads is None or cfg.threads >= 1, f"--threads must be at least 1, got {cfg.threads}"),
        (cfg.latency_runs >= 1 and cfg.latency_batch >= 1,
         f"latency needs runs >= 1 and batch >= 1, got {cfg.latency_runs} and {cfg.latency_batch}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


def predict_all(candidate: Candidate, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, C) logits for normalised input ``x`` (N, 3, S, S), in batches."""
    return np.concatenate([candidate.predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def score(logits: np.ndarray, truth: np.ndarray, reference: np.ndarray | None) -> dict:
    """accuracy vs ``truth`` (-1: unknown), agreement of top-1 with ``reference`` logits."""
    pred = logits.argmax(axis=1)
    labelled = truth >= 0
    return {"accuracy": round(float((pred[labelled] == truth[labelled]).mean()), 4) if labelled.any() else None,
            "agreement": None if reference is None else round(float((pred == reference.argmax(axis=1)).mean()), 4)}


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 contiguous: :func:`to_input` as a numpy array."""
    x = to_input(torch.from_numpy(np.array(pixels)), mean, std)  # a copy: a memmap is read-only
    return np.ascontiguousarray(x.numpy())


# -- what the file says about itself -------------------------------------------------------------


def deployment_metadata(meta: StudentFile) -> dict:
    """Classes, preprocessing and provenance, stored inside the exported file."""
    s = meta.student
    return {
        "format": EXPORT_FORMAT,
        "student": {"name": s.name, "width": s.width, "image_size": s.image_size, "num_classes": s.num_classes},
        "classes": list(meta.classes),
        "teachers": list(meta.teachers),
        "preprocessing": {"input": "input", "layout": "NCHW", "dtype": "float32", "color": "RGB",
                          "image_size": s.image_size, "resize": RESIZE, "scale": 1 / 255,
                          "mean": list(s.mean), "std": list(s.std)},
        "output": "logits (N, num_classes); softmax gives the probabilities",
        "metrics": meta.metrics,
    }


def onnx_metadata_props(metadata: dict) -> dict[str, str]:
    """Flat string props for ONNX: the whole record under ``distill`` plus the common keys."""
    pre = metadata["preprocessing"]
    return {"distill": json.dumps(metadata), "classes": json.dumps(metadata["classes"]),
            "mean": json.dumps(pre["mean"]), "std": json.dumps(pre["std"]),
            "image_size": str(pre["image_size"]), "preprocessing": json.dumps(pre),
            "student": metadata["student"]["name"], "width": str(metadata["student"].get("width")),
            "teachers": json.dumps(metadata["teachers"])}


# -- ONNX --------------------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, metadata: dict) -> None:
    """Write ``model`` as ONNX (opset 17, input "input", batch axis dynamic) with metadata."""
    import onnx

    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings():
        # The TorchScript-based exporter: the dynamo one needs onnxscript, which we do not ship.
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    _set_onnx_metadata(proto, onnx_metadata_props(metadata))
    onnx.save(proto, str(path))


def _set_onnx_metadata(proto, props: dict[str, str]) -> None:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    proto.producer_name = "distill"
    proto.doc_string = "distill student: " + props["student"]


def quantize_onnx(fp32_path: Path, int8_path: Path, calib: np.ndarray, metadata: dict) -> dict:
    """Static int8 (QDQ, per-channel int8 weights, uint8 activations, min-max ranges) with
    onnxruntime, activation ranges calibrated on ``calib`` (N, 3, S, S) normalised images."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib[i:i + 16] for i in range(0, len(calib), 16))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp, "prepared.onnx")
        try:  # shape inference + graph cleanup, as onnxruntime recommends before quantizing
            quant_pre_process(str(fp32_path), str(prepared))
        except Exception:  # noqa: BLE001 - optional step; quantizing the raw graph also works
            shutil.copyfile(fp32_path, prepared)
        quantize_static(str(prepared), str(int8_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    proto = onnx.load(str(int8_path))
    _set_onnx_metadata(proto, onnx_metadata_props({**metadata, "quantization": "int8"}))
    onnx.save(proto, str(int8_path))
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 per channel", "activations": "uint8 per tensor, min-max"}


# -- TorchScript -------------------------------------------------------------------------------------


def to_torchscript(module: torch.nn.Module, image_size: int):
    """Traced and frozen (batch norm folded into the convolutions)."""
    example = torch.zeros(1, 3, image_size, image_size)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the portable format
        return torch.jit.freeze(torch.jit.trace(module.eval(), example))


def save_torchscript(scripted, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.save is deprecated"
        torch.jit.save(scripted, str(path), _extra_files={"config.json": json.dumps(metadata)})


def load_torchscript(path: str | Path) -> tuple[torch.jit.ScriptModule, dict]:
    """(module, the metadata saved with it)."""
    extra = {"config.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra["config.json"] or "{}")


def quantize_torch(model: torch.nn.Module, calib: np.ndarray, image_size: int):
    """int8 via torch.ao FX graph mode (qconfig "x86": per-channel int8 weights, uint8
    activations, fbgemm/onednn kernels), calibrated on ``calib``; returned as TorchScript."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    example = (torch.zeros(1, 3, image_size, image_size),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), example)
        with torch.no_grad():
            for i in range(0, len(calib), 16):
                prepared(torch.from_numpy(calib[i:i + 16]))
        quantized = convert_fx(prepared)
    return to_torchscript(quantized, image_size)


# -- images: calibration and comparison -----------------------------------------------------------


@dataclass
class ImageSet:
    x: np.ndarray  # (N, 3, S, S) float32, normalised
    truth: np.ndarray  # (N,) int64 class index, -1 unknown
    source: str
    shas: list[str]  # the images' content hashes, in order


def folder_images(folder: str, meta: StudentFile, limit: int | None = None) -> ImageSet:
    """The images under ``folder`` (class folders are the truth), evenly thinned to ``limit``."""
    found = list_images(folder)
    keep = _evenly(len(found.shas), limit)
    shas, paths = [found.shas[i] for i in keep], [found.paths[i] for i in keep]
    labels = [found.labels[i] for i in keep]
    return _image_set(shas, paths, labels, meta, f"{len(shas)} images from {folder}")


def harvested_images(db: str | None, meta: StudentFile, limit: int) -> ImageSet:
    """Up to ``limit`` images the student's teacher answered, those under its training folder first,
    from ``db``, else the store the run recorded (its config.json), else the default store."""
    trained_with = meta.config.get("db")
    path = db or (trained_with if trained_with and Path(trained_with).exists() else default_db_path())
    if not Path(path).exists():
        raise DistillError(f"no database at {path} for calibration images: pass --db or --calib-images DIR")
    spec = first_teacher(meta.teachers)
    store = open_store(path)
    try:
        row = store.find_teacher(spec) if spec else None
        shas = sorted(store.answers(row["id"])) if row else []
        paths, labels = store.image_paths(shas), store.image_labels(shas)
    finally:
        store.close()
    usable = [s for s in shas if s in paths and Path(paths[s]).is_file()]
    trained = meta.config.get("images")
    own = [s for s in usable if trained and Path(paths[s]).resolve().is_relative_to(Path(trained).resolve())]
    chosen = own or usable
    if not chosen:
        raise DistillError(f"no harvested image of teacher {spec} is readable from {path}: "
                           "pass --calib-images DIR")
    chosen = [chosen[i] for i in _evenly(len(chosen), limit)]
    where = "the student's training images" if own else "all harvested images"
    return _image_set(chosen, [paths[s] for s in chosen], [labels.get(s) for s in chosen], meta,
                      f"{len(chosen)} of {where} in {path}")


def _image_set(shas, paths, labels, meta: StudentFile, source: str) -> ImageSet:
    pixels = load_pixels(shas, paths, meta.image_size)
    return ImageSet(normalise(pixels, meta.student.mean, meta.student.std), folder_classes(labels, meta.classes),
                    source, list(shas))


def _evenly(n: int, limit: int | None) -> list[int]:
    if limit is None or n <= limit:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, limit)})


# -- the export ------------------------------------------------------------------------------------


def default_out(student: str, fmt: str, int8: bool) -> Path:
    run = Path(student)
    run = run.parent if run.suffix == ".pt" else run
    stem = "model.int8" if int8 else "model"
    return run / (f"{stem}.onnx" if fmt == "onnx" else f"{stem}.torchscript.pt")


def export_student(cfg: ExportConfig) -> dict:
    """Export ``cfg.student``; returns what was written and how it was checked (``--json``).

    fp32 exports are checked against PyTorch on the same inputs: a max abs difference of
    the logits above 1e-3 is an error. ``int8`` adds ``quantization``: accuracy, agreement
    and latency of PyTorch fp32, the fp32 export and the int8 export, measured side by side.
    """
    check_config(cfg)
    if cfg.format == "onnx":
        require_onnx()
    model, meta = open_student(cfg.student)
    size = meta.image_size
    out = Path(cfg.out) if cfg.out else default_out(cfg.student, cfg.format, cfg.int8)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = deployment_metadata(meta)
    threads = cfg.threads or torch.get_num_threads()
    calib = compare = None
    if cfg.int8:
        calib = (folder_images(cfg.calib_images, meta, cfg.calib_count) if cfg.calib_images
                 else harvested_images(cfg.db, meta, cfg.calib_count))
    if cfg.images:
        compare = folder_images(cfg.images, meta)
    shown = compare or calib  # real images for the check when there are any
    check_inputs = shown.x[:8] if shown else _random_inputs(size)
    with torch_threads(threads), tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp, out.name) if cfg.int8 else out
        fp32 = write_fp32(cfg.format, model, fp32_path, size, metadata, threads)
        diff = max_abs_diff(fp32, model, check_inputs)
        if diff > MAX_ABS_DIFF:
            raise DistillError(f"the {cfg.format} export differs from PyTorch by {diff:.2e} (> {MAX_ABS_DIFF}): "
                               "try the other --format, and report it with the student's name")
        result = {"format": cfg.format, "out": str(out), "int8": cfg.int8,
                  "check": {"max_abs_diff": diff, "batch_sizes": [len(check_inputs), 1],
                            "runtime": _runtime(cfg.format),
                            "inputs": shown.source if shown else f"{len(check_inputs)} random normal inputs"},
                  "metadata": metadata}
        if cfg.int8:
            result["quantization"] = _quantize_and_compare(cfg, model, meta, fp32, out, (calib, shown))
    result["file_bytes"] = out.stat().st_size
    if cfg.format == "onnx":
        result["opset"] = OPSET
    return result


def write_fp32(fmt: str, model: torch.nn.Module, path: Path, size: int, metadata: dict, threads: int) -> Candidate:
    """Export ``model`` (input ``size`` px) to ``path`` in ``fmt``; returns the file, loaded back,
    ready to run."""
    if fmt == "onnx":
        export_onnx(model, path, size, metadata)
        return onnx_candidate("onnx fp32", path, size, threads)
    save_torchscript(to_torchscript(model, size), path, metadata)
    return torch_candidate("torchscript fp32", load_torchscript(path)[0], size, path.stat().st_size)


def _quantize_and_compare(cfg: ExportConfig, model, meta: StudentFile, fp32: Candidate, out: Path,
                          images: tuple[ImageSet, ImageSet]) -> dict:
    calib, compare = images
    size = meta.image_size
    threads = torch.get_num_threads()
    metadata = {**deployment_metadata(meta), "quantization": "int8"}
    if cfg.format == "onnx":
        method = quantize_onnx(fp32.path, out, calib.x, metadata)
        int8 = onnx_candidate("onnx int8", out, size, threads)
    else:
        save_torchscript(quantize_torch(model, calib.x, size), out, metadata)
        int8 = torch_candidate("torchscript int8", load_torchscript(out)[0], size, out.stat().st_size)
        method = {"tool": "torch.ao.quantization FX graph mode", "qconfig": "x86",
                  "weights": "int8 per channel", "activations": "uint8 per tensor, observed ranges"}
    reference = torch_candidate("pytorch fp32", model, size, None)
    rows = compare_candidates([reference, fp32, int8], compare, cfg)
    by_name = {r["name"]: r for r in rows}
    before, after = by_name[fp32.name], by_name[int8.name]
    return {"method": method, "calibration": {"images": len(calib.x), "source": calib.source},
            "compared_on": {"images": len(compare.x), "labelled": int((compare.truth >= 0).sum()),
                            "source": compare.source},
            "threads": threads, "models": rows,
            "accuracy_change": _diff(after["accuracy"], before["accuracy"]),
            "agreement_int8_vs_fp32": after["agreement"],
            "speedup_batch1": ratio(before["ms_batch1"], after["ms_batch1"]),
            "speedup_batch1_vs_pytorch": ratio(by_name["pytorch fp32"]["ms_batch1"], after["ms_batch1"]),
            "size_ratio": ratio(before["file_bytes"], after["file_bytes"])}


def compare_candidates(candidates: list[Candidate], images: ImageSet, cfg: ExportConfig) -> list[dict]:
    """Per candidate: accuracy, agreement with the first one, latency at batch 1 and
    ``cfg.latency_batch`` (interleaved), file size."""
    logits = {c.name: predict_all(c, images.x) for c in candidates}
    reference = logits[candidates[0].name]
    ms = interleaved_latency(candidates, (1, cfg.latency_batch), cfg.latency_runs)
    return [{"name": c.name, **score(logits[c.name], images.truth, reference),
             "ms_batch1": ms[c.name]["ms_batch1"], "batch": cfg.latency_batch,
             "ms_batch": ms[c.name][f"ms_batch{cfg.latency_batch}"], "file_bytes": c.file_bytes}
            for c in candidates]


def max_abs_diff(candidate: Candidate, model: torch.nn.Module, x: np.ndarray) -> float:
    """Largest |logit difference| from PyTorch, on the batch ``x`` and on its first image alone
    (two batch sizes: the batch axis must be dynamic)."""
    reference = torch_candidate("pytorch", model, candidate.image_size)
    diffs = [float(np.abs(candidate.predict(b) - reference.predict(b)).max()) for b in (x, x[:1])]
    return max(diffs)


def _random_inputs(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 3, size, size), dtype=np.float32)


def _runtime(fmt: str) -> str:
    if fmt == "onnx":
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"
    return f"torch {torch.__version__} (torch.jit.load)"


def _diff(a, b) -> float | None:
    return None if a is None or b is None else round(a - b, 4)
