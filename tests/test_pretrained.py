"""--pretrained auto|on|off and --init through train, eval, export and resume (no network: the
conftest makes every test offline with empty weight caches)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_app.cli import app
from distill_app.deploy.evaluate import evaluate
from distill_app.deploy.export import ExportConfig, export_student
from distill_app.deploy.measure import onnx_session
from distill_app.errors import DistillError
from distill_app.training.checkpoint import open_student
from distill_app.training.trainer import train
from students import create_student
from test_train import config, dataset, make_dataset, store_answers, workspace  # noqa: F401  (fixtures)

HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def init_file(tmp_path):
    """An "ImageNet" MobileNetV2 x0.35 (1000 classes) that carries its own normalisation."""
    path = tmp_path / "imagenet035.pt"
    torch.manual_seed(1)
    torch.save({"state_dict": create_student("mobilenetv2", 1000, width=0.35).state_dict(),
                "normalize": {"mean": list(HALF), "std": list(HALF)}}, path)
    return path


def test_init_normalize_reaches_the_student_eval_and_onnx(dataset, init_file):
    summary = train(config(dataset, epochs=1, init=str(init_file), out="run"))
    assert summary["weights"] == f"init:{init_file}"
    model, meta = open_student(dataset / "run")
    assert meta.student.mean == HALF and meta.student.std == HALF
    assert meta.weights["source"] == f"init:{init_file}" and meta.weights["mean"] == list(HALF)
    assert model.classifier[-1].out_features == 4  # the ImageNet head was replaced
    result = evaluate(dataset / "run", dataset / "photos", db_path=dataset / "distill.db", latency=False)
    assert result["model"]["mean"] == list(HALF) and result["model"]["std"] == list(HALF)
    export_student(ExportConfig(student=str(dataset / "run"), format="onnx"))
    props = onnx_session(dataset / "run" / "model.onnx", 1).get_modelmeta().custom_metadata_map
    assert json.loads(props["mean"]) == list(HALF) and json.loads(props["std"]) == list(HALF)


def test_resume_keeps_the_weights_provenance_without_the_file(dataset, init_file):
    train(config(dataset, epochs=1, init=str(init_file), out="run"))
    init_file.unlink()  # a resumed run takes its weights from last.pt, never from the init file again
    summary = train(config(dataset, epochs=2, init=str(init_file), out="run", resume=True))
    assert summary["epochs"] == 2 and summary["weights"] == f"init:{init_file}"
    assert open_student(dataset / "run")[1].student.mean == HALF


def test_auto_falls_back_with_one_line_and_on_fails_with_one(dataset, caplog):
    args = ["train", "--images", str(dataset / "photos"), "--db", str(dataset / "distill.db"), "--width", "0.5",
            "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--json"]
    res = CliRunner().invoke(app, [*args, "--out", "auto"])
    assert res.exit_code == 0, res.output
    # The notice is a warning of the trainer's logger (the CLI sends warnings to stderr).
    notes = [r.getMessage() for r in caplog.records if "random init" in r.getMessage()]
    assert len(notes) == 1 and "no ImageNet weights for mobilenetv2 x0.5" in notes[0] and "--init FILE" in notes[0]
    assert json.loads(res.output.strip().splitlines()[-1])["weights"] == "random"
    assert "epoch 1/1  train loss " in res.output and "weights random;" in res.output  # the human lines
    res = CliRunner().invoke(app, [*args, "--out", "on", "--pretrained", "on"])
    assert res.exit_code == 1 and "Error: no ImageNet weights for mobilenetv2 x0.5" in res.output
    assert len([line for line in res.output.splitlines() if "no ImageNet weights" in line]) == 1
    with pytest.raises(DistillError, match="--pretrained must be one of"):
        train(config(dataset, pretrained="maybe"))


def test_backbone_learning_rate_scales_all_but_the_head(dataset, init_file):
    from distill_app.training.loop import make_optimizer

    model = create_student("mobilenetv2", 4, width=0.35)
    opt = make_optimizer(model, 1e-3, 0.05, backbone_lr=0.1)
    head = {id(p) for p in model.classifier.parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert group["lr_scale"] == (1.0 if in_head == {True} else 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
