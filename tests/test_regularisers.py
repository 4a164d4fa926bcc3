"""DSD (dense -> sparse -> dense) and DisturbLabel, through the real trainer on a tiny dataset."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_app.cli import app
from distill_app.errors import DistillError
from distill_app.training import dsd
from distill_app.training.losses import disturb_labels
from distill_app.training.trainer import train
from test_train import config, dataset, workspace  # noqa: F401  (fixtures)


def test_disturb_label_redraws_about_p_of_the_labels():
    labels = torch.arange(10).repeat(10_000)  # 100,000 labels of 10 classes
    out = disturb_labels(labels, 10, 0.2, torch.Generator().manual_seed(0))
    changed = (out != labels).float().mean().item()
    # Chosen with probability 0.2, redrawn from all 10 classes (itself included): 0.2 * 9/10 change.
    assert changed == pytest.approx(0.18, abs=0.005)
    assert out.min() >= 0 and out.max() <= 9 and out.dtype == labels.dtype
    # Redrawn uniformly: every class gets about a tenth of the changed labels.
    counts = torch.bincount(out[out != labels], minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01
    again = disturb_labels(labels, 10, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # repeatable per batch seed: resume reproduces it
    assert torch.equal(disturb_labels(labels, 10, 0.0), labels)


def test_disturb_label_trains_and_needs_the_hard_term(dataset):
    summary = train(config(dataset, epochs=1, hard_weight=0.5, disturb_label=0.2, out="runs/dl"))
    assert summary["epochs"] == 1
    with pytest.raises(DistillError, match="--hard-weight"):
        train(config(dataset, disturb_label=0.2, out="runs/dl2"))


def test_magnitude_masks_keep_the_largest_weights_of_every_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    masks = dsd.magnitude_masks(model, 0.75)
    for name, weight in dsd.prunable(model).items():
        kept = weight.detach().abs()[masks[name]]
        dropped = weight.detach().abs()[~masks[name]]
        assert masks[name].sum() == -(-weight.numel() // 4)  # ceil(25%)
        assert kept.min() >= dropped.max()
    dsd.apply_masks(model, masks)
    assert dsd.sparsity(model) == pytest.approx(0.75, abs=0.01)
    assert dsd.phase_epochs(10, None) == (4, 3, 3)
    assert [dsd.phase_of(e, (4, 3, 3)) for e in (1, 4, 5, 7, 8, 10)] == ["dense", "dense", "sparse", "sparse",
                                                                      "redense", "redense"]


def test_dsd_holds_pruned_weights_at_zero_in_the_sparse_phase_only(dataset):
    sparse_weights = {}

    def watch(epoch, step, steps, info):
        if info.get("phase") == "epoch" and info["epoch"] == 2:  # the end of the sparse epoch
            sparse_weights.update(torch.load(dataset / "runs/dsd/last.pt", weights_only=True)["model"])

    train(config(dataset, epochs=3, dsd=True, dsd_sparsity=0.6, out="runs/dsd"), progress=watch)
    lines = [json.loads(x) for x in (dataset / "runs/dsd/metrics.jsonl").read_text().splitlines()]
    assert [m["dsd_phase"] for m in lines] == ["dense", "sparse", "redense"]
    assert lines[0]["sparsity"] < 0.01
    # Every optimizer step of the sparse phase ran (AdamW moves all weights), yet 60% stayed at zero.
    assert lines[1]["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert lines[2]["sparsity"] < 0.05  # the pruned weights train again from zero
    final = torch.load(dataset / "runs/dsd/last.pt", weights_only=True)["model"]
    conv = next(k for k, v in sparse_weights.items() if k.endswith("weight") and v.ndim == 4 and v.shape[1] > 1)
    zero = sparse_weights[conv] == 0
    assert zero.float().mean() == pytest.approx(0.6, abs=0.02)
    assert (final[conv][zero] != 0).float().mean() > 0.9  # regrown in the re-dense phase


def test_dsd_resumed_in_the_sparse_phase_repeats_an_uninterrupted_run(dataset):
    run = dict(epochs=4, dsd=True, dsd_phases=[1, 2, 1])
    train(config(dataset, **run, out="straight"))

    class Interrupt(Exception):
        pass

    def stop_in_epoch_3(epoch, step, steps, info):
        if epoch == 3:  # the second sparse epoch: last.pt holds the pruned weights, not the masks
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config(dataset, **run, out="resumed"), progress=stop_in_epoch_3)
    train(config(dataset, **run, out="resumed", resume=True))
    a = torch.load(dataset / "straight/last.pt", weights_only=True)["model"]
    b = torch.load(dataset / "resumed/last.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float()), key


def test_dsd_flags_through_the_cli(dataset):
    result = CliRunner().invoke(app, ["train", "--images", "photos", "--width", "0.35", "--image-size", "32",
                                      "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--dsd",
                                      "--dsd-phases", "1,1,2", "--out", "runs/cli"])
    assert result.exit_code == 1 and "--dsd-phases" in result.output  # 1+1+2 is not --epochs 3
    result = CliRunner().invoke(app, ["train", "--images", "photos", "--width", "0.35", "--image-size", "32",
                                      "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--dsd",
                                      "--dsd-phases", "1,1,1", "--out", "runs/cli"])
    assert result.exit_code == 0, result.output
    assert "sparse (50% zero)" in result.output
