"""distill predict: a run folder and its ONNX export answer alike; bad files are reported and
skipped; --json is JSON Lines with the summary last; --csv writes one row per image."""

import csv
import json

from typer.testing import CliRunner

from conftest import decisive_student, save_test_student
from distill_app.cli import app
from distill_app.deploy.export import ExportConfig, export_student

CLASSES = ["cat", "coffee", "car"]


def _run(tmp_path):
    run = tmp_path / "run"
    save_test_student(run / "model.pt", decisive_student(len(CLASSES)), CLASSES)
    return run


def _predict(*args):
    res = CliRunner().invoke(app, ["predict", *map(str, args), "--json"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    return lines[:-1], lines[-1]


def test_run_folder_and_onnx_export_agree_on_every_image(tmp_path, photos):
    run = _run(tmp_path)
    export_student(ExportConfig(student=str(run), format="onnx"))
    torch_rows, torch_summary = _predict("--student", run, "--images", photos, "--top-k", "2", "--batch-size", "3")
    onnx_rows, onnx_summary = _predict("--student", run / "model.onnx", "--images", photos, "--top-k", "2")
    assert len(torch_rows) == len(onnx_rows) == len(list(photos.rglob("*.jpg"))) == torch_summary["predicted"]
    assert torch_summary["runtime"] == "pytorch" and onnx_summary["runtime"] == "onnxruntime"
    tops = {r["path"]: r["top"][0]["class"] for r in torch_rows}
    assert len(set(tops.values())) > 1  # a student that says one class for everything would prove nothing
    for a, b in zip(torch_rows, onnx_rows):
        assert a["path"] == b["path"] and a["sha256"] == b["sha256"]
        assert a["top"][0]["class"] == b["top"][0]["class"]
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 1e-4
        assert len(a["top"]) == 2 and a["top"][0]["probability"] >= a["top"][1]["probability"]


def test_bad_files_are_reported_and_skipped_and_csv_has_a_row_each(tmp_path, photos):
    run = _run(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    one = sorted(photos.rglob("*.jpg"))[0]
    rows, summary = _predict("--student", run, "--images", one, "--images", broken, "--csv", tmp_path / "p.csv")
    assert [r["path"] for r in rows] == [str(one), str(broken)]
    assert "top" in rows[0] and "error" in rows[1] and summary["failed"] == 1 and summary["predicted"] == 1
    with open(tmp_path / "p.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [str(one), str(broken)]
    assert table[0]["class_1"] == rows[0]["top"][0]["class"] and table[1]["error"]


def test_missing_inputs_fail_in_one_line(tmp_path):
    run = _run(tmp_path)
    res = CliRunner().invoke(app, ["predict", "--student", str(run), "--images", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "neither a file nor a folder" in res.output
    res = CliRunner().invoke(app, ["predict", "--student", str(tmp_path / "x.onnx"), "--images", str(tmp_path)])
    assert res.exit_code == 1 and "no ONNX file" in res.output
