"""A killed training run resumes from its last checkpoint; a failed checkpoint write keeps the old one."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import store_folder_answers
from distill_app.training import checkpoint as checkpoint
from distill_app.training.checkpoint import atomic_save, open_student


def test_sigkill_then_resume(photos, tmp_path):
    store_folder_answers(photos, "t.db", 0.8)
    args = [sys.executable, "-m", "distill_app", "train", "--images", str(photos), "--db", "t.db",
            "--width", "0.35", "--image-size", "32", "--batch-size", "2", "--out", "run", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args + ["--epochs", "40"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    res = subprocess.run(args + ["--epochs", str(done + 1), "--resume"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == done + 1
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(1, done + 2))  # continued, not restarted
    open_student(tmp_path / "run")
    assert not list((tmp_path / "run").glob(".*.tmp"))  # a write the kill cut short is cleaned up


def test_a_resumed_run_removes_what_a_kill_cut_short(photos, tmp_path):
    """A kill mid-write of model.pt leaves its temporary file; the resumed run may never write model.pt
    again (best-on-validation kept), so it removes every such file when it starts."""
    store_folder_answers(photos, "t.db", 0.8)
    args = [sys.executable, "-m", "distill_app", "train", "--images", str(photos), "--db", "t.db", "--width", "0.35",
            "--image-size", "32", "--batch-size", "2", "--out", "run", "--json", "--epochs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["1"], env=env, capture_output=True, text=True, timeout=300, check=True)
    stale = [tmp_path / "run" / ".model.pt.k1ll3d.tmp", tmp_path / "run" / ".last.pt.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    res = subprocess.run(args + ["2", "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not any(path.exists() for path in stale)
    open_student(tmp_path / "run")


def test_disk_full_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_save({"epoch": 1}, target)

    def full_disk(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError):
        atomic_save({"epoch": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
