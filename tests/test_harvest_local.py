"""Harvest with the real local teacher: dedupe, skips, reruns, budgets, the CLI's JSON."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from cache import open_store
from distill_app.cli import app
from distill_app.harvest.engine import HarvestConfig, harvest


@pytest.fixture
def messy(photos):
    """The photos plus a duplicate under another name, a corrupt file and a non-image."""
    shutil.copy(photos / "cat" / "cat-0.jpg", photos / "cat" / "same-photo-again.jpg")
    (photos / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (photos / "readme.md").write_text("# not an image")
    return photos


def test_harvest_local_teacher(messy):
    s = harvest(HarvestConfig(images=str(messy), db="h.db", batch_size=4))
    assert s["teacher"] == "local:efficientnet_lite0"
    assert s["files_found"] == 10 and s["images"] == 8  # the duplicate is one image
    assert s["succeeded"] == 8 and s["failed"] == 0
    assert s["skipped_files"] == 2
    assert set(s["skipped_by_reason"]) == {"not an image file type", "not a readable image: UnidentifiedImageError"}
    store = open_store("h.db")
    t = store.find_teacher("local:efficientnet_lite0")["id"]
    answers = store.answers(t)
    cat_shas = [sha for sha, label in store.image_labels().items() if label == "cat"]
    assert all("cat" in answers[sha][0][0] for sha in cat_shas)  # the teacher sees the cat

    again = harvest(HarvestConfig(images=str(messy), db="h.db"))
    assert again["already_cached"] == 8 and again["sent"] == 0 and again["calls"] == 0


def test_max_calls_stops_cleanly_and_resumes(photos):
    first = harvest(HarvestConfig(images=str(photos), db="m.db", batch_size=2, max_calls=4))
    assert first["succeeded"] == 4 and first["stopped"].startswith("--max-calls reached")
    second = harvest(HarvestConfig(images=str(photos), db="m.db", batch_size=2))
    assert second["already_cached"] == 4 and second["succeeded"] == 4
    store = open_store("m.db")
    assert store.stats()["teachers"][0]["claimed"] == 0


def test_dry_run_sends_nothing(photos):
    s = harvest(HarvestConfig(images=str(photos), db="d.db", dry_run=True, cost_per_1k=1.5))
    assert s["to_send"] == 8 and s["calls"] == 0 and s["estimated_cost_usd"] == 0.012
    assert open_store("d.db").stats()["teachers"][0]["ok"] == 0


def test_cli_json_and_errors(photos):
    runner = CliRunner()
    res = runner.invoke(app, ["harvest", "--images", str(photos), "--db", "c.db", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["succeeded"] == 8
    res = runner.invoke(app, ["harvest", "--images", "no-such-dir", "--db", "c.db"])
    assert res.exit_code == 1 and "is not a folder" in res.output
    res = runner.invoke(app, ["harvest", "--images", str(photos), "--teacher", "nope:x"])
    assert res.exit_code == 1 and "valid prefixes" in res.output


def test_bad_flags_are_reported_before_any_scan(tmp_path):
    from typer.testing import CliRunner

    from distill_app.cli import app

    res = CliRunner().invoke(app, ["harvest", "--images", str(tmp_path / "no-such-folder"), "--rate", "-1"])
    assert res.exit_code == 1 and "--rate must be a positive number" in res.output
    assert not (tmp_path / "distill.db").exists()
