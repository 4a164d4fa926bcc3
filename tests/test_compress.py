"""Deep compression: k-means sharing, the .dc file round trip, and `distill compress` through the
CLI on a real tiny student (trained here on the test_train dataset)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_app.cli import app
from distill_app.deploy.compress import kmeans_1d, reshare, share
from distill_app.errors import DistillError
from distill_app.training.checkpoint import open_student
from distill_app.training.trainer import train
from students import codec
from test_train import config, dataset, workspace  # noqa: F401  (fixtures)


def test_kmeans_1d_finds_separated_clusters():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.2), torch.full((20,), 3.0)])
    values = values + torch.randn(100, generator=torch.Generator().manual_seed(0)) * 0.01
    centroids, assign = kmeans_1d(values, 3)
    assert centroids.tolist() == pytest.approx([-1.0, 0.2, 3.0], abs=0.01)
    assert torch.bincount(assign).tolist() == [50, 30, 20]


def test_share_keeps_zeros_pruned_and_uses_2_to_the_bits_values():
    w = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    w[w.abs() < 0.5] = 0
    s = share(w, 4)
    assert s.codebook.numel() == 16
    rebuilt = s.tensor()
    assert torch.equal(rebuilt == 0, w == 0)
    assert len(torch.unique(rebuilt[w != 0])) <= 16
    kept = w != 0
    assert (rebuilt - w)[kept].abs().mean() < 0.1  # weights near their centroids (16 over a range of ~9)


def test_codec_round_trip_and_damaged_files(tmp_path):
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    w[w.abs() < 0.7] = 0
    s = share(w, 3)
    state = {"fc.weight": s.tensor(), "fc.bias": torch.randn(16), "bn.num_batches_tracked": torch.tensor(7)}
    meta = {"format": "x", "classes": ["a", "b"]}
    size = codec.write(tmp_path / "m.dc", state, {"fc.weight": s}, meta)
    assert size == (tmp_path / "m.dc").stat().st_size
    back, meta_back = codec.read(tmp_path / "m.dc")
    assert meta_back == meta and list(back) == list(state)
    assert torch.equal(back["fc.weight"], state["fc.weight"])
    assert torch.equal(back["fc.bias"], codec.stored_dense(state["fc.bias"]))
    assert back["bn.num_batches_tracked"].item() == 7
    data = (tmp_path / "m.dc").read_bytes()
    (tmp_path / "short.dc").write_bytes(data[:-5])
    with pytest.raises(ValueError, match="damaged or truncated"):
        codec.read(tmp_path / "short.dc")
    (tmp_path / "other.dc").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ValueError, match="not a distill compressed student"):
        codec.read(tmp_path / "other.dc")


def test_reshare_moves_each_centroid_by_the_mean_of_its_weights():
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, -2.0], [1.0, -2.0, 0.0, 0.0]]))
    s = share(layer.weight, 1)  # two centroids: 1 and -2; the zeros stay pruned
    with torch.no_grad():
        layer.weight += torch.tensor([[0.3, 0.0, 5.0, 0.1], [0.0, 0.3, 5.0, 0.0]])  # a "step"
    reshare(layer, {"weight": s})
    # centroid 1: mean(1.3, 1.0, 1.0) = 1.1; centroid -2: mean(-1.9, -1.7) = -1.8; pruned: 0.
    assert layer.weight.tolist() == [pytest.approx([1.1, 1.1, 0.0, -1.8]), pytest.approx([1.1, -1.8, 0.0, 0.0])]


def test_compress_writes_a_smaller_file_that_every_command_loads(dataset):
    train(config(dataset, epochs=2, out="runs/s"))
    result = CliRunner().invoke(app, ["compress", "--student", "runs/s", "--bits", "5", "--sparsity", "0.5",
                                      "--epochs", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    stages = summary["stages"]
    assert [s["stage"] for s in stages] == ["fp32", "pruned 50%", "shared 5-bit", "Huffman (the file)"]
    sizes = [s["bytes"] for s in stages]
    assert sizes == sorted(sizes, reverse=True) and stages[-1]["ratio"] > 5
    assert stages[-1]["bytes"] == (dataset / "runs/s/model.dc").stat().st_size
    assert all(s["val_agreement"] is not None for s in stages) and summary["val_images"] >= 1
    # The shared model in memory and the file decode to the same network.
    assert summary["decoded_max_abs_diff"] < 1e-5
    assert stages[-1]["val_agreement"] == stages[-2]["val_agreement"]
    model, meta = open_student(dataset / "runs/s/model.dc")
    assert meta.compression["config"]["bits"] == 5
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for m in layers:
        assert len(torch.unique(m.weight[m.weight != 0])) <= 32
    depthwise = [m.weight for m in layers if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    pruned = [m.weight for m in layers if not (isinstance(m, torch.nn.Conv2d) and m.groups > 1)]
    assert depthwise and all((w != 0).all() for w in depthwise)  # depthwise kernels are kept whole
    assert sum(int((w == 0).sum()) for w in pruned) / sum(w.numel() for w in pruned) == pytest.approx(0.5, abs=0.01)
    for command in (["predict", "--student", "runs/s/model.dc", "--images", "photos/red"],
                    ["eval", "--student", "runs/s/model.dc", "--images", "photos"],
                    ["export", "--student", "runs/s/model.dc", "--format", "onnx", "--out", "s.onnx"]):
        run = CliRunner().invoke(app, command)
        assert run.exit_code == 0, (command, run.output)


def test_compress_without_a_store_sizes_only_and_bad_files_are_one_line(dataset, tmp_path):
    train(config(dataset, epochs=1, out="runs/t"))
    (dataset / "distill.db").rename(dataset / "moved.db")
    result = CliRunner().invoke(app, ["compress", "--student", "runs/t", "--sparsity", "0", "--out", "t.dc"])
    assert result.exit_code == 0, result.output
    assert "no scores" in result.output
    (dataset / "bad.dc").write_bytes((dataset / "t.dc").read_bytes()[:100])
    run = CliRunner().invoke(app, ["predict", "--student", "bad.dc", "--images", "photos/red"])
    assert run.exit_code == 1 and "damaged or truncated" in run.output
    with pytest.raises(DistillError, match="needs|store|database|answers|no "):
        from distill_app.deploy.compress import CompressConfig, compress_student
        compress_student(CompressConfig(student="runs/t", epochs=1, out="u.dc", device="cpu"))
