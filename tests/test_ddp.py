"""`distill train` under torchrun: two CPU processes (gloo) on the tiny dataset of test_train.

Each process trains on half of every batch and DistributedDataParallel averages the gradients,
so two processes must end with the weights of one process that accumulates the same two halves
(--accum-steps 2): that checks the sharding, the loss weights and the gradient all-reduce at
once. BatchNorm running statistics are left out: each process keeps its own half's, by design.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distill_app.training.checkpoint import open_student
from distill_app.training.trainer import TrainConfig, train
from test_train import make_dataset, store_answers

FLAGS = ["--width", "0.35", "--image-size", "32", "--batch-size", "8", "--device", "cpu"]


@pytest.fixture
def dataset(tmp_path):
    store_answers(tmp_path / "distill.db", make_dataset(tmp_path / "photos"))
    return tmp_path


def torchrun(*args: str) -> subprocess.CompletedProcess:
    # One thread per process: two processes share two cores (torchrun sets it too, noisily).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "distill_app", "train", "--images", "photos", "--db", "distill.db", *FLAGS, *args, "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_process(**overrides) -> dict:
    cfg = TrainConfig(images="photos", db="distill.db", width=0.35, image_size=32, batch_size=8,
                      device="cpu", accum_steps=2, **overrides)
    return train(cfg)


def weights(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["model"]
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_two_processes_train_like_one_accumulating_and_resume(dataset):
    torch.set_num_threads(1)
    one_process(epochs=1, out="one")
    first = torchrun("--epochs", "1", "--out", "two")
    json_lines = [line for line in first.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1, first.stdout  # rank 0 alone prints
    assert json.loads(json_lines[0])["epochs"] == 1
    assert len((dataset / "two/metrics.jsonl").read_text().splitlines()) == 1
    model, meta = open_student(dataset / "two")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, len(meta.classes))

    # --resume under torchrun: every process loads last.pt, and the run goes on as one process's does.
    one_process(epochs=2, out="one", resume=True)
    second = torchrun("--epochs", "2", "--out", "two", "--resume")
    assert json.loads(second.stdout.splitlines()[-1])["epochs"] == 2
    lines = [json.loads(line) for line in (dataset / "two/metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["step"] == 6  # 22 images: 3 batches an epoch

    single, double = weights(dataset / "one/last.pt"), weights(dataset / "two/last.pt")
    assert single.keys() == double.keys()
    for key, value in single.items():
        assert torch.allclose(value, double[key], atol=1e-5, rtol=1e-4), key
    reference = torch.load(dataset / "one/last.pt", weights_only=True)["history"]
    for mine, theirs in zip(lines, reference):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
