"""The trainer on a tiny real dataset: 24 coloured PNGs in class folders, answers stored in a
real SQLite store as a teacher would have left them (the big teacher itself is not run)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache import ImageRow, Response, open_store
from distill_app.training.checkpoint import open_student
from distill_app.training.distributed import Ranks
from distill_app.errors import DistillError
from distill_app.data.images import sha256_bytes
from distill_app.data.pixels import augment, crop_flip, crop_padding, resized_crop_params, to_input
from distill_app.teachers.spec import parse_teacher
from distill_app.training.config import TrainConfig, check_config
from distill_app.training.data import split_val
from distill_app.training.schedule import epoch_batches, epoch_plan, get_lr
from distill_app.training.trainer import train

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
# What an ImageNet teacher might say about a mostly-red, -green or -blue picture.
TEACHER_LABELS = {"red": "fire engine", "green": "green lizard", "blue": "blue jay"}
TEACHER = "local:efficientnet_lite0"


@pytest.fixture(autouse=True)
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "pixel-cache"))
    monkeypatch.delenv("DISTILL_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_dataset(root, per_class=8, seed=0):
    """Class folders of noisy 40x40 PNGs; returns [(sha256, path, label, width, height, bytes)]."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, colour in COLOURS.items():
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            path = root / label / f"{i}.png"
            Image.fromarray(pixels).save(path)
            data = path.read_bytes()
            rows.append((sha256_bytes(data), str(path), label, 40, 40, len(data)))
    (root / "notes.txt").write_text("not an image")  # skipped
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # skipped
    return rows


def store_answers(db, rows, spec=TEACHER, kind="distribution", top_k=None, seed=1):
    """Realistic soft answers: ~0.7 on the right label, the rest spread over the others."""
    rng = np.random.default_rng(seed)
    store = open_store(str(db))
    try:
        store.add_images(ImageRow(sha, path, w, h, n, label) for sha, path, label, w, h, n in rows)
        teacher = store.teacher_id(spec, kind)
        responses = []
        for sha, _, label, *_ in rows:
            logits = rng.normal(0, 0.5, 4)
            logits[list(COLOURS).index(label)] += 2.5
            probs = np.exp(logits) / np.exp(logits).sum()
            names = [*TEACHER_LABELS.values(), "window screen"]
            scores = sorted(zip(names, probs.tolist()), key=lambda p: -p[1])[:top_k]
            responses.append(Response(sha, scores, raw=json.dumps(scores)))
        store.record(teacher, responses)
    finally:
        store.close()


@pytest.fixture
def dataset(workspace):
    rows = make_dataset(workspace / "photos")
    store_answers(workspace / "distill.db", rows)
    return workspace


def config(root, **overrides) -> TrainConfig:
    base = dict(images=str(root / "photos"), db=str(root / "distill.db"), teachers=["local"],
                width=0.35, image_size=32, epochs=2, batch_size=8, val_fraction=0.25, device="cpu")
    return TrainConfig(**{**base, **overrides})


def test_train_writes_a_complete_run_folder(dataset):
    calls = []
    summary = train(config(dataset), progress=lambda *a: calls.append(a))
    out = dataset / "runs" / "mobilenetv2-1"  # the default --out, next free n
    assert summary["out"] == str(Path("runs", "mobilenetv2-1"))
    for name in ("model.pt", "config.json", "metrics.jsonl", "last.pt", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"])
        assert 0 <= m["val_accuracy"] <= 1 and 0 <= m["val_agreement"] <= 1 and m["images_per_s"] > 0
    assert summary["images"]["train"] + summary["images"]["val"] == 24
    assert summary["images"]["val"] >= 1 and summary["skipped"] == 2 and summary["classes"] == 4
    assert summary["best_epoch"] in (1, 2)
    model, meta = open_student(out)
    assert set(meta.classes[:3]) == set(TEACHER_LABELS.values())  # most mass first
    assert meta.classes[3] == "window screen"
    assert meta.teachers == [TEACHER] and meta.student.image_size == 32
    assert list(meta.student.mean) == [0.485, 0.456, 0.406]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    saved = json.loads((out / "config.json").read_text())
    assert saved["teachers"] == [TEACHER] and saved["out"] == summary["out"]
    phases = {c[3]["phase"] for c in calls}
    assert {"images", "pixels", "train", "epoch"} <= phases


def test_kl_loss_hard_targets_and_hard_weight_train(dataset):
    summary = train(config(dataset, epochs=1, loss="kl", targets="hard", temperature=2.0,
                           hard_weight=0.5, out="runs/kl"))
    line = json.loads((dataset / "runs/kl/metrics.jsonl").read_text())
    assert math.isfinite(line["train_loss"]) and summary["epochs"] == 1


def test_resume_continues_exactly_like_an_uninterrupted_run(dataset):
    train(config(dataset, out="straight"))

    class Interrupt(Exception):
        pass

    def stop_in_epoch_2(epoch, step, steps, info):
        if epoch == 2:
            raise Interrupt  # killed during the second epoch, after last.pt of the first

    with pytest.raises(Interrupt):
        train(config(dataset, out="resumed"), progress=stop_in_epoch_2)
    assert torch.load(dataset / "resumed/last.pt", weights_only=True)["epoch"] == 1
    # Flags left at their defaults on resume: the run's own configuration is kept.
    summary = train(TrainConfig(images=str(dataset / "photos"), db=str(dataset / "distill.db"),
                                out="resumed", resume=True, epochs=2, device="cpu"))
    assert summary["epochs"] == 2
    straight = torch.load(dataset / "straight/last.pt", weights_only=True)
    resumed = torch.load(dataset / "resumed/last.pt", weights_only=True)
    assert straight["step"] == resumed["step"]
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float()), key
    assert len((dataset / "resumed/metrics.jsonl").read_text().splitlines()) == 2
    assert straight["history"][1]["val_loss"] == pytest.approx(resumed["history"][1]["val_loss"])


def test_ensemble_with_label_map_and_other(dataset):
    store_answers(dataset / "distill.db", _rows_of(dataset / "photos"), spec="hf:acme/vit", kind="topk",
                  top_k=2, seed=9)
    (dataset / "map.toml").write_text('warm = ["Fire Engine"]\ncool = ["re:(green|blue) .*"]\n')
    summary = train(config(dataset, epochs=1, teachers=["local", "hf:acme/vit@0.5"],
                           label_map=str(dataset / "map.toml"), other=True, out="ens"))
    _, meta = open_student(dataset / "ens")
    assert meta.classes == ["warm", "cool", "other"]
    assert meta.teachers == [TEACHER, "hf:acme/vit@0.5"]
    assert meta.label_map == {"warm": ["Fire Engine"], "cool": ["re:(green|blue) .*"]}
    assert summary["classes"] == 3


def _rows_of(folder):
    rows = []
    for path in sorted(folder.rglob("*.png")):
        data = path.read_bytes()
        if path.name != "broken.png":
            rows.append((sha256_bytes(data), str(path), path.parent.name, 40, 40, len(data)))
    return rows


def test_unknown_teacher_says_to_harvest_first(dataset):
    with pytest.raises(DistillError, match=r"no answers from teacher '?hf:nobody/none.*distill harvest --teacher hf:nobody/none"):
        train(config(dataset, teachers=["hf:nobody/none"]))


def test_missing_database_and_images_are_user_errors(dataset):
    with pytest.raises(DistillError, match="not found"):
        train(config(dataset, db=str(dataset / "nope.db")))
    with pytest.raises(DistillError, match="not a folder"):
        train(config(dataset, images=str(dataset / "nowhere")))
    with pytest.raises(DistillError, match="--targets"):
        train(config(dataset, targets="medium"))


def test_existing_run_needs_resume_and_resume_needs_a_run(dataset):
    (dataset / "runs/taken").mkdir(parents=True)
    (dataset / "runs/taken/last.pt").write_bytes(b"")
    with pytest.raises(DistillError, match="--resume"):
        train(config(dataset, out="runs/taken"))
    with pytest.raises(DistillError, match="nothing to resume"):
        train(config(dataset, out="runs/empty", resume=True))


# -- the pure helpers --------------------------------------------------------------------------


def test_parse_teacher_weights_and_alias():
    assert parse_teacher("local") == (TEACHER, 1.0)
    assert parse_teacher("hf:a/b@0.3") == ("hf:a/b", 0.3)
    assert parse_teacher("torchscript:/m@v2/model.pt") == ("torchscript:/m@v2/model.pt", 1.0)
    with pytest.raises(DistillError, match="positive"):
        parse_teacher("google@0")


def test_split_is_stable_and_never_leaves_a_side_empty():
    shas = [f"{i:08x}" + "0" * 56 for i in range(0, 5000, 7)]
    first, again = split_val(shas, 0.1), split_val(list(shas), 0.1)
    assert (first == again).all() and 0.05 < first.mean() < 0.15
    tiny = ["ffffffff" + "0" * 56, "fffffffe" + "0" * 56]
    assert split_val(tiny, 0.1).sum() == 1


def test_lr_warms_up_then_decays():
    lrs = [get_lr(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.02


def test_augment_crops_and_flips_within_the_image():
    x = torch.arange(2 * 32 * 32 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 32, 32, 3)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert set(out[0].flatten().tolist()) <= set(x[0].flatten().tolist())
    same = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert crop_padding(32) == 4 and crop_padding(224) == 28
    normalised = to_input(x)
    assert normalised.shape == (2, 3, 32, 32) and normalised.is_contiguous(memory_format=torch.channels_last)


def test_batches_never_end_with_a_single_image():
    batches = epoch_batches(np.arange(17), 8, seed=0, epoch=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(17))
    assert [len(b) for b in batches] == [8, 9]
    assert [len(b) for b in epoch_batches(np.arange(19), 8, seed=0, epoch=1, min_size=4)] == [8, 11]


def test_crop_flip_is_a_reflect_padded_crop_and_a_mirror():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    offsets = torch.tensor([[-4, 0, 3, 4, -1], [2, -4, 0, 4, -3]])
    flip = torch.tensor([True, False, True, False, True])
    out = crop_flip(x, offsets, flip)
    for i in range(5):
        padded = np.pad(x[i].numpy(), ((4, 4), (4, 4), (0, 0)), mode="reflect")
        r, c = 4 + int(offsets[0, i]), 4 + int(offsets[1, i])
        want = padded[r:r + 16, c:c + 16]
        np.testing.assert_array_equal(out[i].numpy(), want[:, ::-1] if flip[i] else want)


def test_resized_crop_is_a_window_resized_to_the_side_and_a_mirror():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (64, 20, 20, 3), dtype=np.uint8))
    offsets, flip, window = resized_crop_params(64, 20, torch.Generator().manual_seed(1), scale=0.3)
    h, w = window
    assert bool((offsets >= 0).all() and (offsets + window <= 20).all()), "every window lies inside its image"
    share = (h * w).float() / 400
    assert share.min() >= 0.3 - 0.1 and share.max() <= 1 and share.min() < 0.6, "areas spread over [scale, 1]"
    assert flip.any() and not flip.all()
    out = crop_flip(x, offsets, flip, window)
    pick = np.arange(20)
    for i in range(64):
        top, left = int(offsets[0, i]), int(offsets[1, i])
        crop = x[i, top:top + int(h[i]), left:left + int(w[i])].numpy()
        want = crop[pick * int(h[i]) // 20][:, pick * int(w[i]) // 20]
        np.testing.assert_array_equal(out[i].numpy(), want[:, ::-1] if flip[i] else want)
    # The whole image as its own window is the image.
    full = torch.full((2, 64), 20)
    assert torch.equal(crop_flip(x, torch.zeros(2, 64, dtype=torch.long), torch.zeros(64, dtype=torch.bool), full), x)


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_a_crop_scale_outside_0_1_is_a_one_line_error(scale):
    with pytest.raises(DistillError, match=r"^--crop-scale must be in \(0, 1\].*got " + str(scale) + "$"):
        check_config(TrainConfig(images="-", crop_scale=scale))


def test_to_input_normalises_with_the_student_mean_and_std():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (torch.tensor([0, 128, 255]) / 255 - mean) / std
    assert torch.allclose(to_input(x)[0, :, 0, 0], want, atol=1e-5)


def test_processes_and_accumulation_cut_the_same_batches():
    """Two processes get the parts one process accumulates, augmented and dropped out alike."""
    cfg = TrainConfig(images="-", batch_size=8, image_size=32, accum_steps=2, seed=3)
    indices = np.arange(3, 40)
    one = epoch_plan(cfg, indices, 2, Ranks(torch.device("cpu")))
    ranks = [epoch_plan(replace(cfg, accum_steps=1), indices, 2, Ranks(torch.device("cpu"), r, 2)) for r in (0, 1)]
    assert len(one) == 2 * len(ranks[0]) == 2 * len(ranks[1])
    for k, micro in enumerate(one):
        other = ranks[k % 2][k // 2]
        assert np.array_equal(micro.rows, other.rows) and torch.equal(micro.offsets, other.offsets)
        assert torch.equal(micro.flip, other.flip) and micro.seed == other.seed and other.last
        assert micro.last == (k % 2 == 1) and micro.weight * 2 == pytest.approx(other.weight)
    rows = np.concatenate([m.rows for m in one])
    assert sorted(rows.tolist()) == indices.tolist()  # every image once per epoch
    assert sum(m.weight for m in one) == pytest.approx(len(one) / 2)  # the parts of a batch add up to 1


def test_accumulation_trains_and_too_small_batches_are_user_errors(dataset):
    summary = train(config(dataset, epochs=1, accum_steps=2, out="accum"))
    assert summary["epochs"] == 1
    line = json.loads((dataset / "accum/metrics.jsonl").read_text())
    assert math.isfinite(line["train_loss"]) and line["step"] == 3  # 20 images: 8, 8, 4 (2 parts of 2)
    with pytest.raises(DistillError, match="--batch-size >= 8"):
        train(config(dataset, epochs=1, batch_size=6, accum_steps=4, out="tiny"))


def test_dataloader_workers_change_nothing(dataset):
    train(config(dataset, epochs=1, out="inline"))
    train(config(dataset, epochs=1, num_workers=2, out="workers"))
    inline = torch.load(dataset / "inline/last.pt", weights_only=True)["model"]
    workers = torch.load(dataset / "workers/last.pt", weights_only=True)["model"]
    for key, value in inline.items():
        assert torch.equal(value, workers[key]), key


def test_compile_failure_falls_back_to_eager_with_a_warning(dataset, monkeypatch, caplog):
    class Broken(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, x):
            raise RuntimeError("inductor: no C++ compiler\nlong trace")

    monkeypatch.setattr(torch, "compile", Broken)
    summary = train(config(dataset, epochs=1, compile=True, out="compiled"))
    assert summary["epochs"] == 1
    assert any("--compile failed (RuntimeError: inductor: no C++ compiler)" in r.getMessage() for r in caplog.records)


def test_mixup_mixes_images_soft_targets_and_hard_labels_with_the_same_weights():
    from distill_app.training.losses import mixup

    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    soft = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    hard = torch.tensor([0, 1, 2, 3])
    mx, ms, mh = mixup(x.clone(), soft.clone(), hard, 0.7)
    for i in range(4):  # image i is mixed with image 3 - i, everything with 0.7 / 0.3
        assert torch.allclose(mx[i], 0.7 * x[i] + 0.3 * x[3 - i])
        assert torch.allclose(ms[i], 0.7 * soft[i] + 0.3 * soft[3 - i])
        expected = torch.zeros(5)
        expected[hard[i]] += 0.7
        expected[hard[3 - i]] += 0.3
        assert torch.allclose(mh[i], expected)
    assert torch.allclose(ms.sum(1), torch.ones(4))


def test_logit_mse_is_zero_for_the_teachers_own_logits_up_to_a_constant():
    from distill_app.training.losses import distill_loss

    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(logits, dim=1)
    assert distill_loss(logits + 5.0, probs, None, "logit-mse").item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(-logits, probs, None, "logit-mse").item() > 0.1
    # A class the teacher gave nothing (outside its top k) stays finite.
    assert math.isfinite(distill_loss(logits, torch.tensor([[1.0, 0, 0, 0]] * 3), None, "logit-mse").item())


def test_ema_weights_are_what_model_pt_holds_when_they_agree_better(dataset):
    summary = train(config(dataset, epochs=3, ema=0.9, mixup=0.4, loss="logit-mse", hard_weight=0.5, out="ema"))
    lines = [json.loads(line) for line in (dataset / "ema/metrics.jsonl").read_text().splitlines()]
    assert all({"ema_val_agreement", "ema_val_loss", "kept"} <= set(m) for m in lines)
    best = next(m for m in lines if m["epoch"] == summary["best_epoch"])
    assert summary["kept"] == best["kept"]
    ckpt = torch.load(dataset / "ema/last.pt", weights_only=True)
    model, meta = open_student(dataset / "ema")
    saved = model.state_dict()
    if best["epoch"] == 3:  # model.pt was written at the last epoch: compare with last.pt's weights
        source = ckpt["ema"] if best["kept"] == "ema" else ckpt["model"]
        other = ckpt["model"] if best["kept"] == "ema" else ckpt["ema"]
        assert all(torch.equal(saved[k], source[k]) for k in saved)
        assert not all(torch.equal(saved[k], other[k]) for k in saved)
    assert meta.metrics["val_agreement"] == best["ema_val_agreement" if best["kept"] == "ema" else "val_agreement"]


def test_ema_run_picks_the_ema_weights_when_they_are_better(dataset, monkeypatch):
    """is_better decides, so with the live weights made to look worse (and the EMA's better every
    epoch, so that model.pt is the final epoch's whatever the real figures), model.pt holds the EMA's."""
    from distill_app.training import trainer

    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda run, model=None: (
        {**real(run, model), "val_agreement": float(run.epoch)} if model is not None
        else {**real(run), "val_agreement": -1.0}))
    train(config(dataset, epochs=2, ema=0.5, out="ema-wins"))
    ckpt = torch.load(dataset / "ema-wins/last.pt", weights_only=True)
    model, _ = open_student(dataset / "ema-wins")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in model.state_dict().items())
    lines = [json.loads(line) for line in (dataset / "ema-wins/metrics.jsonl").read_text().splitlines()]
    assert [m["kept"] for m in lines] == ["ema", "ema"]


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_last_holds_the_final_epoch_where_best_holds_the_best_one(dataset, monkeypatch, keep):
    """Agreement made to fall epoch by epoch: best keeps epoch 1, last the final weights."""
    from distill_app.training import trainer

    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda run, model=None: {**real(run, model), "val_agreement": -run.epoch})
    summary = train(config(dataset, epochs=3, keep=keep, out=f"keep-{keep}"))
    assert summary["best_epoch"] == (1 if keep == "best" else 3)
    final = torch.load(dataset / f"keep-{keep}/last.pt", weights_only=True)["model"]
    model, meta = open_student(dataset / f"keep-{keep}")
    same = all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert same == (keep == "last") and meta.metrics["epoch"] == summary["best_epoch"]


def test_resume_with_ema_and_mixup_repeats_an_uninterrupted_run(dataset):
    flags = dict(ema=0.9, mixup=0.4, hard_weight=0.3, disturb_label=0.1, crop_scale=0.4, epochs=3)
    train(config(dataset, out="straight", **flags))

    class Interrupt(Exception):
        pass

    def stop_in_epoch_3(epoch, step, steps, info):
        if epoch == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(dataset, out="resumed", **flags), progress=stop_in_epoch_3)
    train(config(dataset, out="resumed", resume=True, **flags))
    straight = torch.load(dataset / "straight/last.pt", weights_only=True)
    resumed = torch.load(dataset / "resumed/last.pt", weights_only=True)
    for part in ("model", "ema"):
        for key, value in straight[part].items():
            assert torch.allclose(value.float(), resumed[part][key].float()), (part, key)
    assert straight["history"][2]["ema_val_loss"] == pytest.approx(resumed["history"][2]["ema_val_loss"])


def test_epochs_default_from_the_number_of_training_images(dataset):
    from distill_app.training.config import AUTO_MAX, AUTO_MIN, auto_epochs

    assert auto_epochs(3600, 64) == 53  # 57 steps per epoch: ~3,000 steps
    assert auto_epochs(1800, 64) == 104
    assert auto_epochs(900, 64) == 200 and auto_epochs(450, 64) == 375  # 500 calls train 3,000 steps too
    assert auto_epochs(300, 64) == AUTO_MAX and auto_epochs(10**6, 64) == AUTO_MIN
    # Resolved once the data is known, written to config.json; a resume without --epochs keeps it.
    for resume, stop in ((False, 1), (True, 2)):
        with pytest.raises(KeyboardInterrupt):
            train(config(dataset, epochs=None, batch_size=16, out="auto", resume=resume), progress=_stop_after(stop))
        assert json.loads((dataset / "auto/config.json").read_text())["epochs"] == auto_epochs(18, 16) == AUTO_MAX
    assert torch.load(dataset / "auto/last.pt", weights_only=True)["epoch"] == 2


def _stop_after(epochs):
    """A progress callback that interrupts the run once ``epochs`` epochs are recorded."""
    def stop(epoch, step, steps, info):
        if info.get("phase") == "epoch" and epoch >= epochs:
            raise KeyboardInterrupt
    return stop


@pytest.fixture
def part_answered(workspace):
    """The 24 photos, only 16 of them answered: 8 wait for a call that the budget did not reach."""
    rows = make_dataset(workspace / "photos")
    store_answers(workspace / "distill.db", rows[::3] + rows[1::3])
    return workspace, {sha for sha, *_ in rows[2::3]}


def test_unlabeled_images_are_used_only_when_present_and_never_as_labelled(part_answered):
    root, waiting = part_answered
    summary = train(config(root, epochs=2, unlabeled="fixmatch", ema=0.9, out="semi"))
    assert summary["unlabeled_used"] == len(waiting) == 8 and summary["unanswered"] == 8
    assert summary["images"]["train"] + summary["images"]["val"] == 16  # labelled: the answered ones only
    lines = [json.loads(line) for line in (root / "semi/metrics.jsonl").read_text().splitlines()]
    assert all(m["unlabeled"] == 8 and 0 <= m["unlabeled_passed"] <= 1 for m in lines)
    off = train(config(root, epochs=1, out="sup", unlabeled="off"))
    assert off["unlabeled_used"] == 0 and "unlabeled" not in json.loads((root / "sup/metrics.jsonl").read_text())


def test_unlabeled_auto_without_unlabeled_images_trains_supervised(dataset):
    summary = train(config(dataset, epochs=1, out="all-answered"))  # the default: auto
    assert summary["unlabeled_used"] == 0 and summary["unlabeled"] == "off" and "labeller" not in summary
    assert not (dataset / "all-answered/labeller").exists()
    assert json.loads((dataset / "all-answered/config.json").read_text())["keep"] == "best"  # --keep auto
    assert "unlabeled" not in json.loads((dataset / "all-answered/metrics.jsonl").read_text())


def test_resume_with_unlabeled_images_repeats_an_uninterrupted_run(part_answered):
    root, _ = part_answered
    flags = dict(unlabeled="fixmatch", epochs=2)
    train(config(root, out="straight", **flags))
    with pytest.raises(KeyboardInterrupt):
        train(config(root, out="resumed", **flags), progress=_stop_after(1))
    train(config(root, out="resumed", resume=True, **flags))
    straight = torch.load(root / "straight/last.pt", weights_only=True)
    resumed = torch.load(root / "resumed/last.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float()), key
    assert straight["history"][1]["unlabeled_passed"] == resumed["history"][1]["unlabeled_passed"]


def test_pseudo_labels_are_sharpened_and_masked_by_confidence():
    from distill_app.training import unlabeled as semi

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])

    targets, mask = semi.pseudo_targets(Fixed(), torch.zeros(2, 3, 4, 4))
    assert mask.tolist() == [True, False]  # 0.96 passes, 0.36 does not
    assert targets[0, 0] > torch.softmax(torch.tensor([4.0, 0, 0]), 0)[0]  # sharper than the prediction
    logits = torch.randn(2, 3, requires_grad=True)
    assert semi.consistency_loss(logits, targets, torch.tensor([False, False]), "mse", 1.0).item() == 0.0
    weak, strong = semi.views(np.zeros((5, 8, 8, 3), np.uint8) + 100, 3, 8, seed=1)
    assert weak.shape == strong.shape == (3, 8, 8, 3) and strong.dtype == torch.uint8


def test_the_consistency_weight_ramps_up_over_the_first_part_of_the_run():
    from distill_app.training import unlabeled as semi

    total = 100
    assert semi.ramp(0, total) == 0.0
    assert semi.ramp(int(semi.RAMP * total) // 2, total) == pytest.approx(semi.WEIGHT / 2)
    assert semi.ramp(total, total) == semi.WEIGHT
