"""Budgets are spent exactly, on images chosen on purpose: --max-calls/--daily-quota send N images
when N wait (local, hf and google teachers), --select random spreads over the folders in a seeded
order that a rerun (after a clean stop or a SIGKILL) keeps, balanced goes round the folders, and
`distill cache stats` shows how the budget was spent, round by round."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from cache import open_store
from conftest import SERVER_TOKEN, write_photos
from distill_app.cli import app
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.harvest.select import select
from distill_app.teachers.serve import endpoints, server_url
from test_harvest_crash import ok_rows  # the read-only count of a store still being written

FOLDERS = ("cat", "coffee", "rocket", "motorbike")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported


@pytest.fixture
def images(tmp_path) -> Path:
    return write_photos(tmp_path / "images", classes=FOLDERS, per_class=10, size=48)


def cli_harvest(*args: str) -> dict:
    """`distill harvest ARGS --json` in this process; its summary."""
    res = CliRunner().invoke(app, ["harvest", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def answered_shas(db) -> set[str]:
    store = open_store(str(db), create=False)
    try:
        return store.answered(store.teachers()[0]["id"])
    finally:
        store.close()


def answered_folders(db) -> Counter:
    store = open_store(str(db), create=False)
    try:
        teacher = store.teachers()[0]["id"]
        labels = store.image_labels(store.answered(teacher))
    finally:
        store.close()
    return Counter(labels.values())


@pytest.mark.parametrize("max_calls", [5, 20, 33])
def test_local_budget_is_spent_exactly(images, teacher_spec, tmp_path, max_calls):
    s = harvest(HarvestConfig(images=str(images), teacher=teacher_spec, db=str(tmp_path / "l.db"),
                              max_calls=max_calls, batch_size=32, device="cpu"))
    assert s["sent"] == s["succeeded"] == max_calls == sum(answered_folders(tmp_path / "l.db").values())
    assert "--max-calls reached" in s["stopped"]


@pytest.mark.parametrize("teacher, env_var", [("hf:acme/tiny", "HF_TOKEN"), ("google", "GOOGLE_API_KEY")])
def test_remote_budget_is_spent_exactly(images, start_server, tmp_path, monkeypatch, teacher, env_var):
    monkeypatch.setenv(env_var, SERVER_TOKEN)
    url = endpoints(start_server())["hf" if teacher.startswith("hf") else "google"]
    db = tmp_path / "r.db"
    s = harvest(HarvestConfig(images=str(images), teacher=teacher, endpoint=url, db=str(db), daily_quota=20,
                              concurrency=2))
    assert s["sent"] == s["succeeded"] == s["calls"] == 20  # google: one request of 16, then one of 4
    again = harvest(HarvestConfig(images=str(images), teacher=teacher, endpoint=url, db=str(db), daily_quota=20))
    assert again["sent"] == 0 and "daily quota" in again["stopped"]


def test_random_spreads_over_the_folders_and_a_rerun_keeps_its_order(images, teacher_spec, tmp_path):
    def run(db, *budgets, seed=0):
        for budget in budgets:
            res = CliRunner().invoke(app, ["harvest", "--images", str(images), "--teacher", teacher_spec,
                                           "--db", str(db), "--max-calls", str(budget), "--seed", str(seed),
                                           "--device", "cpu"])
            assert res.exit_code == 0, res.output
        return answered_folders(db)

    first = run(tmp_path / "a.db", 12)
    assert len(first) >= 3  # scan order would have given 10 cat + 2 coffee
    assert run(tmp_path / "b.db", 5, 7) == first  # stopped and resumed: the same 12 images
    assert run(tmp_path / "c.db", 12, seed=1) != first  # another seed, another order (fixed: hashes)


def test_balanced_goes_round_the_folders():
    shas = [f"{i:064x}" for i in range(12)]
    labels = {s: FOLDERS[i % 3] if i < 9 else FOLDERS[3] for i, s in enumerate(shas)}  # 3+3+3, then 3
    picked = select("balanced", shas, labels, seed=3)[:8]
    assert Counter(labels[s] for s in picked) == {f: 2 for f in FOLDERS}
    assert select("random", shas, labels, seed=3) == select("random", list(reversed(shas)), labels, seed=3)
    assert sorted(select("random", shas, labels, seed=4)) == sorted(shas)


def test_retries_under_a_tight_budget_never_overspend_and_spend_it_all(images, start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SERVER_TOKEN)
    server = start_server(fail_rate=0.3, fail_modes=("error",))
    s = harvest(HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=endpoints(server)["hf"],
                              db=str(tmp_path / "t.db"), max_calls=20, concurrency=3, wait_scale=0))
    assert s["calls"] == 20  # every call of the budget used, retries included, and not one more
    assert s["succeeded"] + s["failed"] <= 20 and "--max-calls reached" in s["stopped"]


# Images per request: the local teacher's --batch-size 4, hf one image, google up to 16.
PER_REQUEST = {"local": 4, "hf": 1, "google": 16}


@pytest.mark.parametrize("max_calls", [7, 23])  # no multiple of 4 or 16: the last batch is cut
@pytest.mark.parametrize("kind", ["local", "hf", "google"])
def test_max_calls_sends_exactly_n_images_through_the_cli(images, teacher_spec, start_server, monkeypatch,
                                                          kind, max_calls):
    args = ["--images", str(images), "--db", "n.db", "--max-calls", str(max_calls)]
    server = None
    if kind == "local":
        args += ["--teacher", teacher_spec, "--batch-size", "4", "--device", "cpu"]
    else:
        server = start_server()
        monkeypatch.setenv("HF_TOKEN" if kind == "hf" else "GOOGLE_API_KEY", SERVER_TOKEN)
        args += ["--teacher", "hf:acme/tiny" if kind == "hf" else "google", "--endpoint", endpoints(server)[kind],
                 "--concurrency", "3"]
    s = cli_harvest(*args)
    assert s["to_send"] == 40 and s["sent"] == s["succeeded"] == s["calls"] == max_calls
    assert s["requests"] == math.ceil(max_calls / PER_REQUEST[kind]) and "--max-calls reached" in s["stopped"]
    if server:  # what the teacher itself received: N distinct uploads, each once, in as many requests
        seen = requests.get(server_url(server) + "/stats", timeout=5).json()
        assert sum(seen["images"].values()) == len(seen["images"]) == max_calls
        assert seen["answered"] == s["requests"]
    store = open_store("n.db", create=False)
    try:
        teacher = store.teachers()[0]["id"]
        assert len(store.answered(teacher)) == max_calls
        assert sum(r["calls"] for r in store.db["usage"].rows) == max_calls
        ranks = sorted(r["rank"] for r in store.selections(teacher))
    finally:
        store.close()
    assert ranks == list(range(1, max_calls + 1))  # the head of the order, no image skipped


def test_a_harvest_killed_mid_budget_resumes_in_the_same_order(images, start_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SERVER_TOKEN)
    url = endpoints(start_server(latency_ms=150))["hf"]  # slow enough to be killed mid-budget
    common = ["--images", str(images), "--teacher", "hf:acme/tiny", "--endpoint", url, "--seed", "5",
              "--concurrency", "1"]
    cli_harvest(*common, "--db", "whole.db", "--max-calls", "20")
    whole = answered_shas("whole.db")
    assert len(whole) == 20 and len(answered_folders("whole.db")) == 4  # 20 of 40: every folder

    proc = subprocess.Popen([sys.executable, "-m", "distill_app", "harvest", *common, "--db", "killed.db",
                             "--max-calls", "20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.monotonic() + 120
    while ok_rows("killed.db") < 5:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the harvest stored no 5 answers in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = answered_shas("killed.db")
    assert 5 <= len(before) < 18 and before < whole  # what it stored is of the same 20

    # The rest of the budget after the kill: the answers lost in flight go first again, then
    # the same order on, so the 20 are the uninterrupted run's 20.
    s = cli_harvest(*common, "--db", "killed.db", "--max-calls", str(20 - len(before)))
    assert s["busy_elsewhere"] == 0 and s["succeeded"] == 20 - len(before)
    assert answered_shas("killed.db") == whole


def test_cache_stats_shows_the_selections_by_round_and_strategy(images, teacher_spec):
    base = ["--images", str(images), "--teacher", teacher_spec, "--db", "s.db", "--device", "cpu"]
    cli_harvest(*base, "--max-calls", "5")
    cli_harvest(*base, "--max-calls", "7", "--select", "balanced", "--seed", "2")
    res = CliRunner().invoke(app, ["cache", "stats", "--db", "s.db", "--json"])
    assert res.exit_code == 0, res.output
    [teacher] = json.loads(res.stdout.strip().splitlines()[-1])["teachers"]
    assert teacher["selections"] == [
        {"round": 1, "strategy": "random", "selector": None, "seed": 0, "images": 5, "answered": 5},
        {"round": 2, "strategy": "balanced", "selector": None, "seed": 2, "images": 7, "answered": 7},
    ]
    assert "round 1   random       chosen 5  answered 5" in res.output
    assert "round 2   balanced     chosen 7  answered 7" in res.output
    # A store no harvest chose for (answers written directly) lists no rounds.
    store = open_store("empty.db")
    store.teacher_id("local:efficientnet_lite0", "distribution")
    store.close()
    res = CliRunner().invoke(app, ["cache", "stats", "--db", "empty.db", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["teachers"][0]["selections"] == []
    assert "round" not in res.output
