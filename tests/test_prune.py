"""distill prune: channels really removed, the smaller network saved and reloaded, fine-tuned."""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_test_student, store_folder_answers
from distill_app.training.checkpoint import open_student, save_student
from distill_app.cli import app
from distill_app.errors import DistillError
from distill_app.deploy.prune import PruneConfig, channel_scores, prune_student, prune_to, target_widths
from students import count_macs, count_params, create_student
from students.pruned import PRUNED_NAME, expanded_blocks, hidden_channels

CLASSES = ["cat", "coffee"]
TEACHER = "local:efficientnet_lite0"
SIZE = 32


def student() -> torch.nn.Module:
    """A random MobileNetV2 x0.35 with realistic BN statistics (so channel scores differ)."""
    torch.manual_seed(0)
    model = create_student("mobilenetv2", len(CLASSES), width=0.35, image_size=SIZE)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, SIZE, SIZE) * 4 - 2)
    return model.eval()


@pytest.fixture
def workspace(tmp_path, photos) -> dict:
    """Photos with stored teacher answers, and a saved student that records where it was trained."""
    db = tmp_path / "distill.db"
    store_folder_answers(photos, db, 0.7, TEACHER)
    run = tmp_path / "run"
    save_test_student(run / "model.pt", student(), CLASSES, [TEACHER], SIZE,
                      config={"images": str(photos), "db": str(db), "label_map": None, "other": False,
                              "loss": "mse", "targets": "soft", "val_fraction": 0.25})
    return {"run": run, "db": db, "photos": photos}


def test_pruning_removes_channels_and_keeps_the_strongest():
    model = student()
    before = hidden_channels(model)
    params, macs = count_params(model), count_macs(model, SIZE)
    _, block = expanded_blocks(model)[0]
    scores = channel_scores(block.conv[0][0])
    widths = target_widths(before, 0.5, round_to=8, head=True)
    strongest = set(torch.topk(scores, widths[0]).indices.tolist())
    kept_filter = block.conv[0][0].weight[sorted(strongest)].clone()

    prune_to(model, widths)
    after = hidden_channels(model)
    assert after == widths and all(a < b for a, b in zip(after, before) if b > 8)
    assert all(w % 8 == 0 for w in after)
    _, block = expanded_blocks(model)[0]
    expand, dw, project = block.conv[0][0], block.conv[1][0], block.conv[2]
    assert expand.out_channels == dw.in_channels == dw.out_channels == dw.groups == project.in_channels == widths[0]
    assert block.conv[0][1].num_features == block.conv[1][1].num_features == widths[0]
    torch.testing.assert_close(expand.weight, kept_filter)  # the strongest filters, in their order
    assert model.classifier[-1].in_features == widths[-1]
    assert count_params(model) < 0.7 * params and count_macs(model, SIZE) < 0.7 * macs
    assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, len(CLASSES))


def test_prune_student_fine_tunes_saves_and_reloads(workspace, tmp_path):
    out = tmp_path / "pruned"
    result = prune_student(PruneConfig(student=str(workspace["run"]), amount=0.4, steps=2, epochs=1,
                                       out=str(out), batch_size=4, latency_runs=1))
    assert result["out"] == str(out)
    before, after = result["before"], result["after"]
    assert after["parameters"] < before["parameters"] and after["macs"] < before["macs"]
    for r in (before, after):
        assert r["ms_batch1"] > 0 and r["ms_batch32"] > 0 and 0 <= r["val_agreement"] <= 1
        assert r["val_images"] == after["val_images"] > 0
    assert [s["step"] for s in result["per_step"]] == [1, 2]
    assert sum(result["per_step"][0]["hidden_channels"]) > sum(result["per_step"][1]["hidden_channels"])
    assert result["latency"]["threads"] == 1
    assert result["file_bytes"] < (workspace["run"] / "model.pt").stat().st_size

    model, meta = open_student(out)  # rebuilt from name + weights, no extra code at the call site
    assert meta.student.name == PRUNED_NAME
    assert hidden_channels(model) == result["hidden_channels"] == meta.student.hidden_channels
    assert count_params(model) == after["parameters"]
    assert model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, len(CLASSES))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all("val_agreement" in x for x in lines)
    assert json.loads((out / "config.json").read_text())["pruning"]["amount"] == 0.4


def test_a_pruned_student_can_be_pruned_again(workspace, tmp_path):
    first = prune_student(PruneConfig(student=str(workspace["run"]), amount=0.3, epochs=0,
                                      out=str(tmp_path / "p1"), batch_size=4, latency_runs=1))
    second = prune_student(PruneConfig(student=first["out"], amount=0.3, epochs=0,
                                       out=str(tmp_path / "p2"), batch_size=4, latency_runs=1))
    assert second["after"]["parameters"] < first["after"]["parameters"]


def test_user_errors(workspace, tmp_path):
    with pytest.raises(DistillError, match="--amount"):
        prune_student(PruneConfig(student=str(workspace["run"]), amount=1.5))
    with pytest.raises(DistillError, match="already holds"):
        prune_student(PruneConfig(student=str(workspace["run"]), out=str(workspace["run"])))
    timm_run = tmp_path / "timm"
    timm_run.mkdir()
    _, meta = open_student(workspace["run"])
    meta = replace(meta, student=replace(meta.student, name="resnet10t", width=1.0))
    save_student(timm_run / "model.pt", create_student("resnet10t", 2, image_size=SIZE), meta)
    with pytest.raises(DistillError, match="mobilenetv2"):
        prune_student(PruneConfig(student=str(timm_run)))


def test_cli_prune_json(workspace):
    res = CliRunner().invoke(app, ["prune", "--student", str(workspace["run"]), "--amount", "0.5",
                                   "--epochs", "1", "--batch-size", "4", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(summary["out"]).name == "run-pruned50"
    assert (Path(summary["out"]) / "model.pt").exists()
    assert summary["after"]["parameters"] < summary["before"]["parameters"]
