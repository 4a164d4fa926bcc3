"""distill eval --report: every listed file is there, training curves, the teacher side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_test_student, store_folder_answers
from distill_app.cli import app
from distill_app.deploy.evaluate import LatencyOptions, evaluate
from distill_app.deploy.report import training_history, write_report
from students import create_student

CLASSES = ["cat", "coffee"]
TEACHER = "local:efficientnet_lite0"
SIZE = 32


@pytest.fixture
def workspace(tmp_path, photos) -> dict:
    """A saved student with a metrics.jsonl beside it, and stored teacher answers for the photos."""
    db = tmp_path / "distill.db"
    store_folder_answers(photos, db, 0.9, TEACHER)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    save_test_student(run / "model.pt", create_student("mobilenetv2", 2, width=0.35, image_size=SIZE).eval(),
                      CLASSES, [TEACHER], SIZE)
    lines = [{"epoch": e, "train_loss": 0.3 / e, "val_loss": 0.35 / e, "val_accuracy": 0.5 + 0.1 * e,
              "val_agreement": 0.55 + 0.1 * e, "lr": 1e-3} for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 4, "tra')
    return {"run": run, "db": db, "photos": photos}


def _check_listed_files(paths: list[str], folder: Path) -> set[str]:
    names = {Path(p).name for p in paths}
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # exactly the files it lists
    for p in paths:
        assert Path(p).stat().st_size > 0
    text = (folder / "report.md").read_text()
    for name in names - {"report.md", "result.json"}:
        assert f"]({name})" in text  # every plot is shown in the report
    return names


def test_report_lists_every_file_with_training_curves(workspace, tmp_path):
    assert [row["epoch"] for row in training_history(workspace["run"] / "model.pt")] == [1, 2, 3]  # cut line skipped
    result = evaluate(workspace["run"], workspace["photos"], db_path=workspace["db"],
                      latency=LatencyOptions(batch=2, runs=1, warmup=0))
    paths = write_report(result, tmp_path / "report")
    names = _check_listed_files(paths, tmp_path / "report")
    assert names == {"report.md", "result.json", "confusion_matrix.png", "reliability.png", "curves.png"}
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Student and teacher" in text  # stored answers: both accuracies side by side
    assert "top-1 accuracy (images with a teacher answer)" in text and "| 100.0% |" in text


def test_without_metrics_there_are_no_curves(workspace, tmp_path):
    (workspace["run"] / "metrics.jsonl").unlink()
    result = evaluate(workspace["run"], workspace["photos"], db_path=workspace["db"], latency=False)
    names = _check_listed_files(write_report(result, tmp_path / "report"), tmp_path / "report")
    assert "curves.png" not in names


def test_teacher_latency_side_by_side(workspace, tmp_path):
    result = evaluate(workspace["run"], workspace["photos"], db_path=workspace["db"],
                      latency=LatencyOptions(batch=2, runs=1, warmup=0))
    student_ms = result["latency"]["ms_per_image_batch1"]
    # As teacher_latency reports a local teacher (measuring the real one is test_evaluate's job).
    result["latency"]["teacher"] = {"spec": TEACHER, "input_size": [3, 224, 224], "ms_per_image_batch1": 40.0,
                                    "batch": 2, "ms_per_batch": 70.0, "parameters": 4_652_008,
                                    "macs": 398_000_000, "speedup": round(40.0 / student_ms, 2), "note": None}
    write_report(result, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"| CPU latency, batch 1 (1 threads) | {student_ms} ms | 40.0 ms |" in text
    assert "| CPU latency, batch 2 |" in text and "70.0 ms |" in text
    assert "| parameters |" in text and "4,652,008" in text and "398.0 M at 224 px" in text
    assert f"| speed-up at batch 1 | {round(40.0 / student_ms, 2)}x | 1x |" in text


def test_cli_eval_report_json(workspace, tmp_path):
    res = CliRunner().invoke(app, ["eval", "--student", str(workspace["run"]), "--images", str(workspace["photos"]),
                                   "--db", str(workspace["db"]), "--report", str(tmp_path / "rep"), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert {Path(p).name for p in result["report_files"]} >= {"report.md", "curves.png"}
    for p in result["report_files"]:
        assert Path(p).exists()
    # eval --json carries the measured depthwise-separable blocks (an added key: older ones stay).
    assert len(result["model"]["separable"]) == 17 and result["model"]["separable_total"]["blocks"] == 17
    assert result["model"]["macs"] > 0
