"""The `distill` command line. Commands are thin: parse flags, call the library, print."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import List, Optional

import typer

from cache import default_db_path

from . import printers
from .console import emit_json, err, progress, user_errors
from .errors import DistillError
from .loop import DEFAULT_SELECT, LoopConfig, run_loop
from .store_commands import DB_HELP, JSON_HELP, cache_app, labels_app
from .teachers.serve import TOKEN_ENV_VAR

app = typer.Typer(
    help="Distil a paid image-classification API (or any big model) into a small local student.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # our own handler prints one line, secrets redacted
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(cache_app, name="cache")
app.add_typer(labels_app, name="labels")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")


@app.callback()
def main_callback() -> None:
    _setup_logging()


@app.command()
@user_errors
def harvest(
    images: Path = typer.Option(..., help="Folder of images, scanned recursively."),
    teacher: str = typer.Option("local", help="Teacher spec: local, timm:NAME, hf:OWNER/MODEL, google, azure."),
    endpoint: Optional[str] = typer.Option(None, help="Exact URL to POST to (remote teachers)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    rate: Optional[str] = typer.Option(None, help="Requests per second, all threads together (> 0), or 'auto': "
                                       "find what the server allows (slows on 429s either way)."),
    concurrency: int = typer.Option(4, min=1, help="Requests in flight."),
    max_calls: Optional[int] = typer.Option(None, min=0, help="Images to send in this run at most."),
    daily_quota: Optional[int] = typer.Option(None, min=0, help="Images per UTC day for this teacher, across runs."),
    top_k: Optional[int] = typer.Option(None, min=1, help="Labels to ask for / keep per image."),
    upload_size: int = typer.Option(512, min=16, help="Longest side of uploaded images, in pixels."),
    cost_per_1k: float = typer.Option(0.0, min=0.0, help="USD per 1,000 images, for the cost estimate."),
    device: str = typer.Option("auto", help="Local teachers: auto, cpu or cuda."),
    batch_size: int = typer.Option(32, min=1, help="Local teachers: images per forward pass."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be sent and what it would cost."),
    select: str = typer.Option("random", help="Which waiting images a smaller budget goes to: random (seeded), "
                               "balanced (round-robin over the class folders), uncertainty (the --selector "
                               "student's highest entropy first), diversity (k-center greedy on the --selector's "
                               "or else the local teacher's features), typical (TypiClust: the most typical image of each "
                               "k-means cluster, on the same features), hybrid (k-center among the 2 x budget most "
                               "uncertain). Never scan order."),
    selector: Optional[str] = typer.Option(None, help="Student run folder or model.pt that scores the images for "
                                           "--select uncertainty, diversity, typical or hybrid."),
    seed: int = typer.Option(0, min=0, help="Seed of --select: the same seed keeps one order across runs."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Send each image once to the teacher and store every answer.

    Example: distill harvest --images photos/ --teacher hf:google/vit-base-patch16-224 --rate 5
    """
    from .harvest.engine import HarvestConfig, harvest as run_harvest

    cfg = HarvestConfig(
        images=str(images), teacher=teacher, endpoint=endpoint, db=db, rate=_rate(rate),
        concurrency=concurrency, max_calls=max_calls, daily_quota=daily_quota, top_k=top_k,
        upload_size=upload_size, cost_per_1k=cost_per_1k, dry_run=dry_run, device=device,
        batch_size=batch_size, select=select, seed=seed, selector=selector,
    )
    with progress("harvest") as update:
        summary = run_harvest(cfg, progress=update)
    printers.print_harvest(summary)
    if json_out:
        emit_json(summary)


def _rate(value: str | None) -> float | str | None:
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise DistillError(f"--rate must be a positive number of requests per second or 'auto', "
                           f"got {value!r}") from None


def _int_list(flag: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise DistillError(f"{flag} must be comma-separated whole numbers, got {value!r}") from None


@app.command()
@user_errors
def train(
    images: Path = typer.Option(..., help="Folder of images (the harvested ones)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    teacher: Optional[List[str]] = typer.Option(None, help="Teacher spec, optionally SPEC@WEIGHT; repeat for an ensemble."),
    label_map: Optional[Path] = typer.Option(None, help="TOML/JSON: target class -> teacher labels; or 'folders': "
                                             "the map `distill labels suggest` drafts, applied as is."),
    other: bool = typer.Option(False, "--other", help="Add an 'other' class for unmapped mass."),
    max_classes: Optional[int] = typer.Option(None, min=2, help="Without a label map: keep the N most frequent teacher labels."),
    student: str = typer.Option("mobilenetv2", help="Student: mobilenetv2, mobilenetv1 or any timm model name."),
    width: float = typer.Option(1.0, help="MobileNet width multiplier alpha (0.35-1.4)."),
    image_size: int = typer.Option(224, help="Input resolution in pixels (96-224)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Default: enough for ~3,000 optimizer steps, "
                                         "10 to 500 epochs (training.config.auto_epochs)."),
    batch_size: int = typer.Option(64, min=1),
    lr: float = typer.Option(2e-3, help="Peak learning rate (AdamW, cosine schedule)."),
    targets: str = typer.Option("soft", help="soft (teacher probabilities) or hard (its argmax)."),
    loss: str = typer.Option("mse", help="mse (on probabilities), logit-mse (centred logits on log-probabilities) or kl (Hinton, T^2)."),
    temperature: float = typer.Option(1.0, min=0.05),
    hard_weight: float = typer.Option(0.0, min=0.0, help="Weight of cross-entropy on hard labels."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default runs/<student>-<n>)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    seed: int = typer.Option(0),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes."),
    pretrained: str = typer.Option("auto", help="ImageNet weights for the student: auto (from --init, the torch/HF "
                                   "caches or a download; else random init, with a notice), on (fail without), off."),
    init: Optional[Path] = typer.Option(None, help="Initial weights file for the student (a state dict; may carry "
                                        "its normalize mean/std)."),
    backbone_lr: float = typer.Option(0.1, min=0.0, help="With pretrained weights: the backbone's learning rate "
                                      "as a multiple of --lr (the new head gets --lr; 1 trains all alike)."),
    accum_steps: int = typer.Option(1, min=1, help="Forward passes per optimizer step (gradient accumulation): "
                                    "each sees batch-size / (processes x N) images."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the student: for GPUs, slower on CPU (warns and runs without if it fails)."),
    disturb_label: float = typer.Option(0.0, min=0.0, max=0.99, help="DisturbLabel: redraw this fraction of each batch's "
                                        "hard labels at random (the --hard-weight term only; the paper's 0.1)."),
    dsd: bool = typer.Option(False, "--dsd", help="Dense-sparse-dense training: prune --dsd-sparsity of every layer's "
                             "weights after the dense phase, train sparse, then dense again."),
    dsd_sparsity: float = typer.Option(0.5, help="DSD: fraction of each layer's weights held at zero in the sparse phase."),
    dsd_phases: Optional[str] = typer.Option(None, help="DSD: epochs of the dense, sparse and re-dense phases, e.g. "
                                             "4,3,3 (default: thirds of --epochs)."),
    keep: str = typer.Option("auto", help="What model.pt holds: best (the epoch that agreed best with the teacher "
                             "on the validation split), last (the final epoch: better for small budgets), or auto "
                             "(last for both runs of Noisy Student, best otherwise)."),
    crop_scale: float = typer.Option(1.0, help="Random-resized crop: each training image a window of at least this "
                                     "share of its area, resized (1: shift-and-flip only)."),
    mixup: float = typer.Option(0.0, min=0.0, help="Mixup alpha: mix pairs of images and their soft targets with "
                                "Beta(alpha, alpha) weights (0: off)."),
    ema: float = typer.Option(0.0, min=0.0, max=0.99999, help="Keep an exponential moving average of the weights "
                              "with this decay (e.g. 0.999; 0: off); model.pt keeps it when it agrees better."),
    unlabeled: str = typer.Option("auto", help="The images under --images with no usable answer: noisy (Noisy "
                                  "Student: a first student trained on the answers, in OUT/labeller, labels them, "
                                  "then this one trains on both; about twice the time), fixmatch (consistency "
                                  "training), off, or auto (noisy when they are at least a quarter as many as the "
                                  "answered images, else off)."),
    pseudo_labels: Optional[Path] = typer.Option(None, "--pseudo-labels", help="A trained student (run folder "
                                                 "or model.pt): its predictions become the targets of the images "
                                                 "with no usable answer, which then train too (Noisy Student)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a student on the teacher's stored soft labels.

    Example: distill train --images photos/ --label-map classes.toml --width 0.5 --image-size 128

    Several GPUs: torchrun --nproc-per-node 4 $(which distill) train ... (docs/distributed.md)
    """
    from .training.distributed import is_main_process
    from students import PRETRAINED_MODES

    from .training.config import UNLABELED
    from .training.trainer import TrainConfig, train as run_train

    _check_choice("--targets", targets, ("soft", "hard"))
    _check_choice("--loss", loss, ("mse", "logit-mse", "kl"))
    _check_choice("--unlabeled", unlabeled, UNLABELED)
    _check_choice("--pretrained", pretrained, PRETRAINED_MODES)
    cfg = TrainConfig(
        images=str(images), db=db, teachers=list(teacher or ["local"]),
        label_map=str(label_map) if label_map else None, other=other, max_classes=max_classes,
        student=student, width=width, image_size=image_size, epochs=epochs,
        batch_size=batch_size, lr=lr, targets=targets, loss=loss, temperature=temperature,
        hard_weight=hard_weight, out=str(out) if out else None, device=device, resume=resume,
        seed=seed, num_workers=workers, pretrained=pretrained, init=str(init) if init else None,
        backbone_lr=backbone_lr,
        accum_steps=accum_steps, compile=compile_model, disturb_label=disturb_label,
        dsd=dsd, dsd_sparsity=dsd_sparsity, dsd_phases=_int_list("--dsd-phases", dsd_phases),
        keep=keep, crop_scale=crop_scale, mixup=mixup, ema=ema, unlabeled=unlabeled,
        pseudo_labels=str(pseudo_labels) if pseudo_labels else None,
    )
    if not is_main_process():  # under torchrun, rank 0 alone shows progress and prints
        run_train(cfg)
        return
    with progress("train") as update:
        def report(epoch: int, step: int, steps: int, info: dict) -> None:
            if info.get("phase") == "epoch":
                printers.print_epoch(epoch, info["epochs"], info)
            else:
                update(step, steps)

        summary = run_train(cfg, progress=report)
    printers.print_trained(summary)
    if json_out:
        emit_json(summary)


@app.command(name="eval")
@user_errors
def eval_cmd(
    student: Path = typer.Option(..., help="Run folder written by `distill train` (or its model.pt)."),
    images: Path = typer.Option(..., help="Folder of images to evaluate on (class folders = truth)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    teacher: Optional[str] = typer.Option(None, help="Also time this local teacher for comparison."),
    report: Optional[Path] = typer.Option(None, help="Write a Markdown report with plots here."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Measure a student against folder labels and the teacher, and how small and fast it is.

    Example: distill eval --student runs/mobilenetv2-1 --images photos/val --report report/
    """
    from .deploy.evaluate import evaluate
    from .deploy.report import write_report

    result = evaluate(str(student), str(images), db_path=db or default_db_path(), teacher_spec=teacher)
    if report:
        result["report_files"] = write_report(result, str(report))
    printers.print_eval(result)
    if json_out:
        emit_json(result)


@app.command()
@user_errors
def demo(
    workdir: Path = typer.Option(Path("distill-demo"), help="Where the sample images, store and run go."),
    epochs: int = typer.Option(30, min=1),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Harvest -> train -> eval on built-in sample photos with the local teacher (offline, no key).

    Example: distill demo
    """
    from .demo import run_demo

    result = run_demo(workdir, epochs=epochs, log=lambda msg: err.print(msg, markup=False))
    if json_out:
        emit_json(result)


@app.command(name="serve-teacher")
@user_errors
def serve_teacher(
    teacher: str = typer.Option(..., help="Local teacher to serve: local, timm:NAME[:CKPT], torchscript:PATH."),
    wire_format: Optional[str] = typer.Option(None, "--format", help="Serve only this wire format: hf or google (default: both)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to listen on (0: any free port)."),
    token: Optional[str] = typer.Option(None, envvar=TOKEN_ENV_VAR, show_default=False,
                                        help="Require this key: hf 'Bearer TOKEN', google '?key=TOKEN'."),
    rate: Optional[float] = typer.Option(None, min=0.001, help="Requests per second; more get 429 with Retry-After."),
    latency_ms: float = typer.Option(0.0, min=0.0, help="Milliseconds added to every request."),
    fail_rate: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of requests that fail (503, 500, dropped, garbage)."),
    fail_mix: Optional[str] = typer.Option(None, help="Failures by kind instead of --fail-rate, e.g. "
                                           "loading=0.05,drop=0.02,garbage=0.02 (kinds: loading, error, drop, garbage)."),
    loading_s: float = typer.Option(0.05, min=0.0, help="The estimated_time of a 503 'loading' answer, in seconds."),
) -> None:
    """Serve a local teacher on the hf and google wire formats (self-hosting, demos, tests).

    Example: distill serve-teacher --teacher local --port 8000 --rate 20 --fail-rate 0.1
    """
    from .teachers.serve import FORMATS, ServeOptions, run_forever

    if wire_format is not None:
        _check_choice("--format", wire_format, FORMATS)
    options = ServeOptions(
        teacher=teacher, host=host, port=port, formats=(wire_format,) if wire_format else FORMATS,
        token=token or None, rate=rate, latency_ms=latency_ms, fail_rate=fail_rate,
        fail_mix=_fail_mix(fail_mix), loading_s=loading_s,
    )
    if not token and host not in ("127.0.0.1", "::1", "localhost"):
        err.print(f"warning: serving on {host} without --token: anyone who can reach it can use it",
                  markup=False)
    run_forever(options, announce=lambda line: err.print(line, markup=False, highlight=False))


def _fail_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        mode, eq, value = part.partition("=")
        try:
            mix[mode.strip()] = float(value) if eq else math.nan
        except ValueError:
            mix[mode.strip()] = math.nan
        if math.isnan(mix[mode.strip()]):
            raise DistillError(f"--fail-mix takes MODE=P pairs, e.g. loading=0.05,drop=0.02; got {part!r}")
    return mix


@app.command()
@user_errors
def export(
    student: Path = typer.Option(..., help="Run folder written by `distill train` (or its model.pt)."),
    fmt: str = typer.Option(..., "--format", help="onnx or torchscript."),
    int8: bool = typer.Option(False, "--int8", help="Post-training static int8 quantization, calibrated on images."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: <run>/model[.int8].onnx or .torchscript.pt)."),
    calib_images: Optional[Path] = typer.Option(None, help="--int8: calibration images (default: harvested ones in --db, from the student's training folder)."),
    images: Optional[Path] = typer.Option(None, help="Labelled images to check and compare on (default: the calibration images)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    calib_count: int = typer.Option(128, min=1, help="--int8: calibration images to use at most."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for the latency figures (default: PyTorch's)."),
    latency_runs: int = typer.Option(10, min=1, help="Timed runs per model and batch size (median)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Export a student to ONNX (checked with onnxruntime) or TorchScript, optionally int8.

    Example: distill export --student runs/mobilenetv2-1 --format onnx --int8 --images photos/val
    """
    from .deploy.export import FORMATS, ExportConfig, export_student

    _check_choice("--format", fmt, FORMATS)
    result = export_student(ExportConfig(
        student=str(student), format=fmt, out=str(out) if out else None, int8=int8,
        calib_images=str(calib_images) if calib_images else None, images=str(images) if images else None,
        db=db, calib_count=calib_count, threads=threads, latency_runs=latency_runs))
    printers.print_export(result)
    if json_out:
        emit_json(result)


@app.command()
@user_errors
def prune(
    student: Path = typer.Option(..., help="Run folder of a trained mobilenetv2 student (or its model.pt)."),
    amount: float = typer.Option(0.3, help="Fraction of hidden channels to remove, between 0 and 1."),
    steps: int = typer.Option(1, min=1, help="Prune in this many slices, fine-tuning after each."),
    epochs: int = typer.Option(3, min=0, help="Fine-tuning epochs after each slice."),
    images: Optional[Path] = typer.Option(None, help="Training images (default: the ones the student was trained on)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP + " Must hold the teacher's answers."),
    out: Optional[Path] = typer.Option(None, help="New run folder (default: <run>-pruned<percent>)."),
    batch_size: int = typer.Option(64, min=2),
    lr: float = typer.Option(1e-3, help="Peak fine-tuning learning rate (AdamW, cosine)."),
    head: bool = typer.Option(True, "--head/--no-head", help="Also prune the last 1x1 convolution."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Remove the weakest channels of a MobileNetV2 student (L1 norm), then fine-tune it on the teacher's answers.

    Example: distill prune --student runs/mobilenetv2-1 --amount 0.3 --steps 2 --epochs 3
    """
    from .deploy.prune import PruneConfig, prune_student

    cfg = PruneConfig(student=str(student), amount=amount, steps=steps, epochs=epochs,
                      images=str(images) if images else None, db=db, out=str(out) if out else None,
                      batch_size=batch_size, lr=lr, head=head, device=device)
    with progress("fine-tune") as update:
        result = prune_student(cfg, progress=lambda step, done, total, info: update(done, total))
    for when in ("before", "after"):
        r = result[when]
        err.print(f"{when:<7} parameters {r['parameters']:,}  MACs {r['macs'] / 1e6:.1f} M  "
                  f"batch 1 {r['ms_batch1']} ms  batch 32 {r['ms_batch32']} ms  "
                  f"val accuracy {r['val_accuracy']:.4f}  agreement {r['val_agreement']:.4f}", markup=False)
    err.print(f"wrote {result['out']} ({result['latency']['threads']} threads, "
              f"{result['latency']['speedup_batch1']}x at batch 1)", markup=False)
    if json_out:
        emit_json(result)


@app.command()
@user_errors
def loop(
    images: Path = typer.Option(..., help="Folder of images: the pool the budget is spent on."),
    teacher: str = typer.Option(..., help="Teacher spec (as for harvest)."),
    budget: int = typer.Option(..., min=1, help="Calls in all, over every round."),
    rounds: int = typer.Option(..., min=1, help="Harvest-then-train rounds; each spends budget/rounds."),
    select: str = typer.Option(DEFAULT_SELECT, help="How rounds after the first choose: typical, uncertainty, "
                               "diversity, hybrid (with the previous round's student), random or balanced. Round 1: "
                               "k-center for diversity, typical for typical and hybrid, else random."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    endpoint: Optional[str] = typer.Option(None, help="Teacher endpoint URL (remote teachers)."),
    top_k: Optional[int] = typer.Option(None, min=1, help="Labels per answer (remote teachers)."),
    label_map: Optional[Path] = typer.Option(None, help="As for train."),
    width: float = typer.Option(1.0, help="Student width multiplier alpha."),
    image_size: int = typer.Option(224, help="Student input resolution in pixels."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs per round (default: as train's)."),
    batch_size: int = typer.Option(64, min=2),
    pretrained: str = typer.Option("auto", help="As for train: ImageNet weights for every round's student."),
    init: Optional[Path] = typer.Option(None, help="As for train: initial weights of round 1 (of every round "
                                        "not warm-started)."),
    val: Optional[Path] = typer.Option(None, help="Labelled folder to evaluate each round's student on."),
    out: Path = typer.Option(Path("runs/loop"), help="Folder of the rounds (round-1, ...) and the final model.pt."),
    warm_start: Optional[bool] = typer.Option(None, "--warm-start/--cold-start", show_default=False,
                                              help="Rounds after the first start from the previous round's "
                                              "student, or from scratch. Default: warm when round 1 started "
                                              "from random init, cold when from ImageNet weights."),
    unlabeled: str = typer.Option("auto", help="As for train, for the last round's student: auto (Noisy Student on "
                                  "the images no call reached, when they are at least a quarter as many as the "
                                  "answered ones), noisy, fixmatch or off. Earlier rounds train on their answers."),
    seed: int = typer.Option(0, min=0),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Harvest and train in rounds, each round's student choosing the next images; rerun to resume.

    Example: distill loop --images photos/ --teacher local --budget 1000 --rounds 4 --select typical
    """
    from .harvest.select import STRATEGIES
    from .training.config import UNLABELED

    from students import PRETRAINED_MODES

    _check_choice("--select", select, STRATEGIES)
    _check_choice("--pretrained", pretrained, PRETRAINED_MODES)
    _check_choice("--unlabeled", unlabeled, UNLABELED)
    train_flags = {"width": width, "image_size": image_size, "epochs": epochs, "batch_size": batch_size,
                   "label_map": str(label_map) if label_map else None, "pretrained": pretrained,
                   "init": str(init) if init else None}
    cfg = LoopConfig(images=str(images), teacher=teacher, budget=budget, rounds=rounds, select=select, out=str(out),
                     db=db, endpoint=endpoint, top_k=top_k, val=str(val) if val else None, seed=seed, warm_start=warm_start,
                     unlabeled=unlabeled, train=train_flags)
    result = run_loop(cfg, log=lambda line: err.print(line, markup=False))
    if json_out:
        emit_json(result)


@app.command()
@user_errors
def compress(
    student: Path = typer.Option(..., help="Run folder of a trained student (or its model.pt)."),
    bits: int = typer.Option(5, min=1, max=8, help="Shared values per layer: 2^bits (k-means)."),
    sparsity: float = typer.Option(0.5, help="Fraction of each layer's weights pruned first, depthwise kernels "
                                   "excepted (0: share only)."),
    epochs: int = typer.Option(0, min=0, help="Fine-tuning epochs after pruning and after sharing (needs the training store)."),
    out: Optional[Path] = typer.Option(None, help="The .dc file (default: model.dc in the run folder)."),
    images: Optional[Path] = typer.Option(None, help="Training images (default: the ones the student was trained on)."),
    db: Optional[str] = typer.Option(None, help=DB_HELP + " Scores each stage on the student's validation split."),
    lr: float = typer.Option(5e-4, help="Peak fine-tuning learning rate (AdamW, cosine)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Deep compression: prune, share weights (k-means), Huffman-code; a .dc file predict, eval and export load.

    Example: distill compress --student runs/mobilenetv2-1 --bits 5 --sparsity 0.5 --epochs 1
    """
    from .deploy.compress import CompressConfig, compress_student

    cfg = CompressConfig(student=str(student), bits=bits, sparsity=sparsity, epochs=epochs,
                         out=str(out) if out else None, images=str(images) if images else None, db=db,
                         lr=lr, device=device)
    with progress("fine-tune") as update:
        result = compress_student(cfg, progress=lambda step, done, total, info: update(done, total))
    printers.print_compressed(result)
    if json_out:
        emit_json(result)


@app.command()
@user_errors
def predict(
    student: Path = typer.Option(..., help="Run folder written by `distill train`, its model.pt, or a .onnx export."),
    images: List[Path] = typer.Option(..., help="Image file or folder (scanned recursively); repeat for more."),
    top_k: int = typer.Option(5, min=1, help="Classes to report per image."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    device: str = typer.Option("auto", help="PyTorch students: auto, cpu or cuda (ONNX runs on the CPU)."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write path, sha256, then class and probability per rank."),
    json_out: bool = typer.Option(False, "--json", help="JSON Lines: one object per image, the summary last."),
) -> None:
    """The student's top-k classes and probabilities for every image.

    Example: distill predict --student runs/mobilenetv2-1 --images new-photos/ --top-k 3 --csv predictions.csv
    """
    from .deploy.predict import run_predict

    with progress("predict") as update:
        rows, summary = run_predict(str(student), [str(p) for p in images], top_k, batch_size, device, update)
    if csv_out:
        printers.write_csv(csv_out, rows, top_k)
    for row in rows:
        if json_out:
            sys.stdout.write(json.dumps(row) + "\n")
        elif "error" in row:
            err.print(f"skipped {row['path']}: {row['error']}", markup=False)
        else:
            top = "  ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
            sys.stdout.write(f"{row['path']}\t{top}\n")
    err.print(f"predicted {summary['predicted']}  failed {summary['failed']}  skipped files {summary['skipped_files']}  "
              f"{summary['seconds']:.1f}s  {summary['images_per_s']} images/s ({summary['runtime']})", markup=False)
    if json_out:
        emit_json(summary)


def _check_choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{value!r}; choose one of {', '.join(choices)}", param_hint=flag)


def main() -> None:
    app()
