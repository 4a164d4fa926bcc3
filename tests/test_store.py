"""The SQLite store: schema, migrations, claims, answers, usage — on a real file."""

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cache import ImageRow, Response, StoreError, open_store
from cache.migrations import MIGRATIONS

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path / "s.db"))
    s.add_images([ImageRow(SHA_A, "x/a.jpg", 4, 3, 100, "cat"), ImageRow(SHA_B, "b.jpg", 4, 3, 90, None)])
    yield s
    s.close()


def test_migrations_recorded_and_columns(tmp_path):
    s = open_store(str(tmp_path / "m.db"))
    names = [r["name"] for r in s.db["_migrations"].rows]
    assert names == [m.__name__ for m in MIGRATIONS]
    assert {"image", "teacher", "status", "http_status", "raw", "scores", "error", "latency_ms",
            "attempts", "answered_at", "claim_owner", "claimed_until"} <= set(s.db["responses"].columns_dict)
    assert s.db.journal_mode == "wal"
    s.close()
    again = open_store(str(tmp_path / "m.db"))  # reopening applies nothing twice
    assert len(list(again.db["_migrations"].rows)) == len(MIGRATIONS)


def test_same_content_is_one_image(store):
    store.add_images([ImageRow(SHA_A, "other/name.jpg", 4, 3, 100, "cat")])
    assert store.db["images"].count == 2
    assert store.db["paths"].count == 3
    assert store.image_paths([SHA_A]) == {SHA_A: "x/a.jpg"}  # first path kept


def test_answers_and_failures(store):
    t = store.teacher_id("local:x", "distribution")
    assert store.teacher_id("local:x", "distribution") == t
    store.record(t, [Response(SHA_A, [("cat", 0.9), ("dog", 0.1)], raw="{}", http_status=200),
                     Response(SHA_B, None, error="HTTP 400: bad image", http_status=400)])
    assert store.answers(t) == {SHA_A: [("cat", 0.9), ("dog", 0.1)]}
    assert store.answered(t) == {SHA_A}
    assert store.failures(t) == {"HTTP 400: bad image": 1}


def test_claims_exclusive_until_lease_expires(store):
    t = store.teacher_id("hf:a/b", "topk")
    assert store.claim(t, [SHA_A, SHA_B], "one", lease_s=60) == [SHA_A, SHA_B]
    assert store.claim(t, [SHA_A, SHA_B], "two", lease_s=60) == []
    store.record(t, [Response(SHA_A, [("cat", 1.0)])])
    # an expired lease (its owner died) may be taken again; an answered image never
    store.db.execute("UPDATE responses SET claimed_until = 0 WHERE image = ?", [SHA_B])
    store.db.conn.commit()
    assert store.claim(t, [SHA_A, SHA_B], "two", lease_s=60) == [SHA_B]


def test_release_restores_previous_state(store):
    t = store.teacher_id("hf:a/b", "topk")
    store.record(t, [Response(SHA_B, None, error="HTTP 500")])
    store.claim(t, [SHA_A, SHA_B], "me", lease_s=60)
    store.release_owner(t, "me")
    rows = {r["image"]: r for r in store.db["responses"].rows}
    assert SHA_A not in rows  # a first claim leaves no trace
    assert rows[SHA_B]["status"] == "failed" and rows[SHA_B]["error"] == "HTTP 500"


def test_usage_counts_per_day_across_opens(tmp_path, store):
    t = store.teacher_id("hf:a/b", "topk")
    store.add_usage(t, 3, 0.003)
    store.add_usage(t, 2, 0.002)
    store.add_usage(t, 7, day="2000-01-01")
    assert store.calls_on(t) == 5
    assert store.calls_on(t, "2000-01-01") == 7
    assert store.stats()["teachers"][0]["calls"] == 12


def test_not_a_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a distill database"):
        open_store(str(bad))


def test_locked_database_waits_then_clear_error(tmp_path):
    path = str(tmp_path / "l.db")
    open_store(path).close()
    blocker = sqlite3.connect(path)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            open_store(path, timeout=0.2)
    finally:
        blocker.rollback()
        blocker.close()


def test_lock_released_within_the_timeout_is_waited_for(tmp_path):
    path = str(tmp_path / "w.db")
    open_store(path).close()
    blocker = sqlite3.connect(path, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, blocker.rollback).start()
    store = open_store(path, timeout=10)  # neither the open nor the write fails meanwhile
    blocker.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, blocker.rollback).start()
    store.add_usage(store.teacher_id("t", "prob"), 3)
    assert store.calls_on(store.teacher_id("t", "prob")) == 3
    store.close()
    blocker.close()


_OPENER = """
import sys, time
from cache.store import open_store
path, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
store = open_store(path)
teacher = store.teacher_id("t", "prob")
for _ in range(20):
    store.add_usage(teacher, 1)
store.close()
"""


def test_processes_opening_one_new_database_at_once_all_succeed(tmp_path):
    path = str(tmp_path / "new.db")
    start = time.time() + 1.5  # after every interpreter has started: they open together
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, path, str(start)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, errors
    store = open_store(path)
    assert store.calls_on(store.teacher_id("t", "prob")) == 6 * 20
    assert len(store.teachers()) == 1
    store.close()


def test_read_only_commands_never_create_a_database(tmp_path):
    from typer.testing import CliRunner

    from distill_app.cli import app

    typo = tmp_path / "typo.db"
    with pytest.raises(StoreError, match="no database at"):
        open_store(str(typo), create=False)
    for args in (["cache", "stats"], ["cache", "labels"], ["cache", "export"]):
        res = CliRunner().invoke(app, [*args, "--db", str(typo)])
        assert res.exit_code == 1 and "no database at" in res.output, (args, res.output)
    assert not typo.exists()


def test_reads_of_many_images_leave_no_transaction_open(store):
    """Over 900 SHAs go through a temporary table; its INSERT must not leave an implicit
    transaction behind, or the next write (BEGIN IMMEDIATE) fails: a harvest of 4,000 images did."""
    shas = [f"{i:064x}" for i in range(2000)]
    store.add_images(ImageRow(s, f"{i}.jpg", 4, 3, 10, None) for i, s in enumerate(shas))
    t = store.teacher_id("hf:a/b", "topk")
    store.record(t, [Response(s, [("cat", 1.0)]) for s in shas[:1500]])
    assert len(store.answered(t, shas)) == 1500
    assert len(store.answers(t, shas)) == 1500
    assert not store.db.conn.in_transaction
    assert store.claim(t, shas, "me", lease_s=60) == shas[1500:]  # a write transaction
    store.release_owner(t, "me")
    with store.immediate():  # ... and inside one, a big read keeps the caller's transaction
        assert len(store.answered(t, shas)) == 1500
        assert store.db.conn.in_transaction


def test_selections_by_round_and_rank(store):
    t = store.teacher_id("local:x", "distribution")
    assert store.last_selection_round(t) == 0 and store.selections() == []
    store.add_selections(t, 1, [(SHA_B, 1), (SHA_A, 2)], "uncertainty", "/runs/s", seed=3)
    store.add_selections(t, 1, [(SHA_B, 5)], "uncertainty", "/runs/s", seed=3)  # claimed again: first row kept
    store.add_selections(t, 2, [(SHA_A, 1)], "random")
    rows = store.selections(t)
    assert [(r["image"], r["round"], r["rank"], r["strategy"], r["selector"], r["seed"]) for r in rows] == [
        (SHA_B, 1, 1, "uncertainty", "/runs/s", 3), (SHA_A, 1, 2, "uncertainty", "/runs/s", 3),
        (SHA_A, 2, 1, "random", None, None)]
    assert store.last_selection_round(t) == 2 and store.selections(t, round_=2) == rows[2:]
    assert rows[0]["selected_at"]
