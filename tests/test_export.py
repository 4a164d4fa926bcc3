"""distill export: ONNX and TorchScript round trips, metadata, int8 quantization, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import decisive_student, save_test_student, store_folder_answers
from distill_app.training.checkpoint import open_student
from distill_app.cli import app
from distill_app.errors import DistillError
from distill_app.deploy.export import ExportConfig, export_student, load_torchscript, normalise
from distill_app.deploy.measure import onnx_session
from distill_app.data.pixels import load_pixels
from students import STUDENT_MEAN, STUDENT_STD

CLASSES = ["cat", "coffee"]
TEACHER = "local:efficientnet_lite0"
SIZE = 32


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    save_test_student(out / "model.pt", decisive_student(len(CLASSES), SIZE), CLASSES, [TEACHER], SIZE)
    return out


def store_with_answers(db: Path, photos: Path) -> None:
    """Every photo recorded as harvested by the teacher (answers follow the folder label)."""
    store_folder_answers(photos, db, 0.8, TEACHER)


def photo_batch(photos: Path) -> np.ndarray:
    files = sorted(photos.rglob("*.jpg"))
    shas = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    return normalise(load_pixels(shas, [str(f) for f in files], SIZE), STUDENT_MEAN, STUDENT_STD)


def test_onnx_round_trip_dynamic_batch_and_metadata(run, photos):
    result = export_student(ExportConfig(student=str(run), format="onnx", images=str(photos)))
    path = run / "model.onnx"
    assert result["out"] == str(path) and path.stat().st_size == result["file_bytes"]
    assert result["check"]["max_abs_diff"] < 1e-4
    assert result["check"]["batch_sizes"] == [8, 1]
    assert "8 images" in result["check"]["inputs"]

    session = onnx_session(path, threads=1)
    assert session.get_inputs()[0].name == "input"
    model, _ = open_student(run)
    x = photo_batch(photos)
    for batch in (1, 3):  # the batch axis is dynamic
        got = session.run(None, {"input": x[:batch]})[0]
        with torch.no_grad():
            want = model(torch.from_numpy(x[:batch])).numpy()
        assert got.shape == (batch, len(CLASSES))
        np.testing.assert_allclose(got, want, atol=1e-4)

    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == CLASSES
    assert json.loads(props["mean"]) == pytest.approx(list(STUDENT_MEAN))
    assert json.loads(props["std"]) == pytest.approx(list(STUDENT_STD))
    assert props["image_size"] == str(SIZE)
    assert props["student"] == "mobilenetv2" and props["width"] == "0.35"
    assert json.loads(props["teachers"]) == [TEACHER]
    assert json.loads(props["distill"])["preprocessing"]["layout"] == "NCHW"


def test_torchscript_round_trip_with_metadata(run, tmp_path):
    out = tmp_path / "exported" / "student.pt"
    result = export_student(ExportConfig(student=str(run / "model.pt"), format="torchscript", out=str(out)))
    assert result["out"] == str(out) and result["check"]["max_abs_diff"] < 1e-4
    assert "random" in result["check"]["inputs"]
    module, metadata = load_torchscript(out)
    assert metadata["classes"] == CLASSES and metadata["preprocessing"]["image_size"] == SIZE
    model, _ = open_student(run)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), atol=1e-4, rtol=1e-4)


def test_int8_onnx_from_harvested_images_is_smaller_and_reports_before_after(run, photos, tmp_path):
    db = tmp_path / "distill.db"
    store_with_answers(db, photos)
    fp32 = export_student(ExportConfig(student=str(run), format="onnx"))
    result = export_student(ExportConfig(student=str(run), format="onnx", int8=True, db=str(db),
                                         latency_runs=2, latency_batch=4))
    int8_path = run / "model.int8.onnx"
    assert result["out"] == str(int8_path)
    assert result["file_bytes"] < fp32["file_bytes"]  # int8 weights: a smaller file

    q = result["quantization"]
    assert q["calibration"]["images"] == 8 and "all harvested images" in q["calibration"]["source"]
    assert q["compared_on"]["labelled"] == 8
    names = [m["name"] for m in q["models"]]
    assert names == ["pytorch fp32", "onnx fp32", "onnx int8"]
    for row in q["models"]:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["agreement"] <= 1
        assert row["ms_batch1"] > 0 and row["ms_batch"] > 0 and row["batch"] == 4
    assert q["models"][1]["agreement"] == 1.0  # fp32 ONNX predicts what PyTorch predicts
    assert q["accuracy_change"] is not None and q["speedup_batch1"] > 0 and q["size_ratio"] > 1
    assert q["threads"] == 1

    session = onnx_session(int8_path, threads=1)  # the int8 model runs, at any batch size
    out = session.run(None, {"input": photo_batch(photos)[:3]})[0]
    assert out.shape == (3, len(CLASSES)) and np.isfinite(out).all()
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == CLASSES


def test_int8_torchscript_runs(run, photos):
    result = export_student(ExportConfig(student=str(run), format="torchscript", int8=True,
                                         calib_images=str(photos), latency_runs=1, latency_batch=2))
    path = Path(result["out"])
    assert path.name == "model.int8.torchscript.pt"
    assert [m["name"] for m in result["quantization"]["models"]][-1] == "torchscript int8"
    assert result["quantization"]["size_ratio"] > 1
    module, metadata = load_torchscript(path)
    assert metadata["quantization"] == "int8"
    with torch.no_grad():
        assert module(torch.from_numpy(photo_batch(photos)[:2])).shape == (2, len(CLASSES))


def test_user_errors(run, tmp_path):
    with pytest.raises(DistillError, match="--format"):
        export_student(ExportConfig(student=str(run), format="tflite"))
    with pytest.raises(DistillError, match="no database"):
        export_student(ExportConfig(student=str(run), format="onnx", int8=True, db=str(tmp_path / "no.db")))
    with pytest.raises(DistillError, match="no student"):
        export_student(ExportConfig(student=str(tmp_path / "nothing"), format="onnx"))


def test_cli_export_json(run, photos):
    res = CliRunner().invoke(app, ["export", "--student", str(run), "--format", "onnx", "--int8",
                                   "--calib-images", str(photos), "--latency-runs", "1", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["out"].endswith("model.int8.onnx") and summary["quantization"]["models"]
    assert Path(summary["out"]).exists()
    bad = CliRunner().invoke(app, ["export", "--student", str(run), "--format", "tflite"])
    assert bad.exit_code == 2  # bad usage


def test_int8_without_db_calibrates_on_the_store_the_run_recorded(tmp_path, photos):
    db = tmp_path / "elsewhere" / "answers.db"
    db.parent.mkdir()
    store_with_answers(db, photos)
    run = tmp_path / "recorded"
    save_test_student(run / "model.pt", decisive_student(len(CLASSES), SIZE), CLASSES, [TEACHER], SIZE,
                      config={"db": str(db), "images": str(photos), "label_map": None})
    result = export_student(ExportConfig(student=str(run), format="onnx", int8=True, latency_runs=1, latency_batch=2))
    assert str(db) in result["quantization"]["calibration"]["source"]
    assert not (tmp_path / "distill.db").exists()  # the default store was never created
