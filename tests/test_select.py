"""Budgets are spent exactly, on images chosen on purpose: --max-calls/--daily-quota send N images
when N wait (local, hf and google teachers), --select random spreads over the folders in a seeded
order that a rerun keeps, and balanced goes round the folders."""

from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache import open_store
from conftest import SERVER_TOKEN, write_photos
from distill_app.cli import app
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.harvest.select import select
from distill_app.teachers.serve import endpoints

FOLDERS = ("cat", "coffee", "rocket", "motorbike")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported


@pytest.fixture
def images(tmp_path) -> Path:
    return write_photos(tmp_path / "images", classes=FOLDERS, per_class=10, size=48)


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
