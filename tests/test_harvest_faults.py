"""Harvest through misbehaving servers: rate limits, loading models, dropped connections,
garbage, wrong keys, per-image 400s; every image is answered once and nothing is paid twice."""

import glob
import json
import os

import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from cache import open_store
from conftest import SERVER_TOKEN, write_photos
from distill_app.cli import app
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.teachers.serve import endpoints, server_url
from distill_app.teachers import TeacherOptions, TransientError, create_teacher

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported

TOKEN = SERVER_TOKEN




@pytest.fixture
def hf_key(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def stats(server):
    return requests.get(server_url(server) + "/stats", timeout=5).json()


def hf_config(images, server, **kwargs) -> HarvestConfig:
    kwargs.setdefault("db", "f.db")
    kwargs.setdefault("wait_scale", 0)
    return HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=endpoints(server)["hf"], **kwargs)


def assert_each_image_answered_once(server, n_images):
    counts = stats(server)["images"]
    assert len(counts) == n_images and set(counts.values()) == {1}, counts


# --- what the teacher raises for each failure, and what the harvest makes of it -------------------


@pytest.mark.parametrize("mode, reason, retry_after", [
    ("loading", "HTTP 503", 0.05),  # estimated_time from the body
    ("error", "HTTP 500", None),
    ("drop", "connection dropped", None),
    ("garbage", "malformed answer", None),
])
def test_each_failure_is_transient(start_server, hf_key, mode, reason, retry_after):
    server = start_server(fail_rate=1.0, fail_modes=(mode,))
    teacher = create_teacher("hf:acme/tiny", TeacherOptions(endpoint=endpoints(server)["hf"]))
    with pytest.raises(TransientError) as info:
        teacher.classify([b"\xff\xd8 any bytes"])
    assert info.value.reason == reason and info.value.retry_after == retry_after
    teacher.close()


def test_429_carries_retry_after_and_timeouts_are_transient(start_server, hf_key):
    server = start_server(rate=1)
    teacher = create_teacher("hf:acme/tiny", TeacherOptions(endpoint=endpoints(server)["hf"]))
    teacher.classify([b"first request is admitted"])
    with pytest.raises(TransientError) as info:
        teacher.classify([b"second one within the second is not"])
    assert (info.value.reason, info.value.status, info.value.retry_after) == ("HTTP 429", 429, 1.0)

    slow = start_server(latency_ms=400)
    teacher = create_teacher("hf:acme/tiny", TeacherOptions(endpoint=endpoints(slow)["hf"], timeout=0.1))
    with pytest.raises(TransientError, match="timeout"):
        teacher.classify([b"x"])


@pytest.mark.parametrize("mode", ["loading", "drop", "garbage"])
def test_harvest_retries_through_each_failure(photos, start_server, hf_key, mode):
    server = start_server(fail_rate=0.4, fail_modes=(mode,), seed=1)
    s = harvest(hf_config(photos, server, max_attempts=12, concurrency=2))
    assert s["succeeded"] == 8 and s["failed"] == 0
    assert s["requests"] > 8  # some requests failed and were retried
    outcome = {"loading": "503", "drop": "dropped", "garbage": "200"}[mode]
    assert stats(server)["by_status"].get(outcome, 0) > (8 if mode == "garbage" else 0)
    assert_each_image_answered_once(server, 8)
    store = open_store("f.db")
    attempts = [r[0] for r in store.db.execute("SELECT attempts FROM responses")]
    assert max(attempts) > 1 and sum(attempts) == s["requests"]
    store.close()


def test_rate_limited_server_429_retry_after(tmp_path, start_server, hf_key):
    images = write_photos(tmp_path / "imgs", per_class=8, size=32)  # 16 images
    server = start_server(rate=8)  # 8 requests in any 1 s window
    # Retry-After is 1 s; wait_scale 0.25 makes that 0.25 s, enough for the window to move on.
    s = harvest(hf_config(images, server, concurrency=4, max_attempts=12, wait_scale=0.25))
    assert s["succeeded"] == 16 and s["failed"] == 0
    by_status = stats(server)["by_status"]
    assert by_status["429"] > 0 and by_status["200"] == 16
    assert s["requests"] == 16 + by_status["429"]
    assert_each_image_answered_once(server, 16)


def test_fail_rate_every_image_answered_once(tmp_path, start_server, hf_key):
    images = write_photos(tmp_path / "imgs", per_class=12, size=32)  # 24 images
    server = start_server(fail_rate=0.3, seed=7)  # 503, 500, dropped, garbage
    s = harvest(hf_config(images, server, concurrency=4, max_attempts=12))
    assert s["succeeded"] == 24 and s["failed"] == 0
    st = stats(server)
    assert st["answered"] == 24 and st["requests"] == s["requests"] > 24
    assert len(set(st["by_status"]) - {"200"}) >= 2  # several kinds of failure were seen
    assert_each_image_answered_once(server, 24)  # failed requests are retried, never answered twice


def test_google_batch_survives_failures(tmp_path, start_server, monkeypatch):
    images = write_photos(tmp_path / "imgs", per_class=20, size=32)  # 40 images: 3 requests
    monkeypatch.setenv("GOOGLE_API_KEY", TOKEN)
    server = start_server(fail_rate=0.3, seed=3)
    s = harvest(HarvestConfig(images=str(images), teacher="google", endpoint=endpoints(server)["google"],
                              db="g.db", wait_scale=0, max_attempts=12))
    assert s["succeeded"] == 40 and s["failed"] == 0
    assert s["requests"] > 3 and stats(server)["answered"] == 3  # failed requests were retried whole
    assert_each_image_answered_once(server, 40)


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher, env_var", [("hf:acme/tiny", "HF_TOKEN"), ("google", "GOOGLE_API_KEY")])
def test_wrong_key_stops_the_run_and_leaks_nowhere(photos, start_server, monkeypatch, teacher, env_var):
    server = start_server()
    wrong_key = "WRONG-key-d41d8cd98f00b204"
    monkeypatch.setenv(env_var, wrong_key)
    endpoint = endpoints(server)["hf" if teacher.startswith("hf") else "google"]
    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--teacher", teacher,
                                   "--endpoint", endpoint, "--db", "k.db", "--json"])
    assert res.exit_code == 1
    errors = [line for line in res.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and env_var in errors[0] and "rejected the key" in errors[0], res.stderr
    assert res.stdout.strip() == ""  # no JSON summary for a run that stopped on an error
    assert wrong_key not in res.output and wrong_key not in res.stderr and wrong_key not in res.stdout
    db_files = glob.glob("k.db*")
    assert db_files
    for path in db_files:
        with open(path, "rb") as f:
            assert wrong_key.encode() not in f.read(), path
    store = open_store("k.db")
    assert store.stats()["teachers"][0]["claimed"] == 0  # claims given back: a fixed key goes on
    assert store.stats()["teachers"][0]["failed"] == 0  # a bad key is not the images' fault
    store.close()
    assert stats(server)["requests"] <= 4  # stopped at once (requests in flight only)


def test_right_key_via_cli_json(photos, start_server, hf_key):
    server = start_server()
    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--teacher", "hf:acme/tiny",
                                   "--endpoint", endpoints(server)["hf"], "--db", "k.db", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["succeeded"] == 8
    assert TOKEN not in res.output and TOKEN not in res.stderr


# --- reruns ----------------------------------------------------------------------------------------


def test_rerun_after_success_sends_nothing(photos, start_server, hf_key):
    server = start_server()
    first = harvest(hf_config(photos, server))
    assert first["succeeded"] == 8
    before = stats(server)["requests"]
    again = harvest(hf_config(photos, server))
    assert again["already_cached"] == 8 and again["sent"] == 0 and again["calls"] == 0
    assert stats(server)["requests"] == before


def test_400_for_one_image_marks_it_failed_and_a_later_run_retries_it(photos, start_server, hf_key):
    noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
    noise.save(photos / "cat" / "big-noise.jpg", quality=95)
    server = start_server(max_image_bytes=30_000)
    first = harvest(hf_config(photos, server))
    assert first["succeeded"] == 8 and first["failed"] == 1 and first["requests"] == 9  # no retry
    [reason] = first["failed_by_reason"]
    assert reason.startswith("HTTP 400: Image too large")
    store = open_store("f.db")
    row = store.db.execute("SELECT status, http_status, error, scores FROM responses WHERE status != 'ok'").fetchone()
    assert row[:2] == ("failed", 400) and row[3] is None  # never used as a label
    store.close()

    server.service.options.max_image_bytes = None  # the server now takes it
    second = harvest(hf_config(photos, server))
    assert second["already_cached"] == 8 and second["sent"] == 1 and second["succeeded"] == 1
    assert stats(server)["requests"] == 10
    assert_each_image_answered_once(server, 9)
