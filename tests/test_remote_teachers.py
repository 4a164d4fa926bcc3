"""Remote teachers (hf, google, azure) end to end against loopback servers, and their parsers.

The hf and google paths run against `serve-teacher` serving a tiny TorchScript model; azure has
no serve-teacher format, so a small handler in this file speaks it.
"""

import base64
import email.utils
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cache import open_store
from conftest import SERVER_TOKEN, QuietHandler, write_photos
from distill_app.errors import DistillError
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.teachers.serve import endpoints, server_url
from distill_app.teachers import MULTILABEL, TOPK, AuthError, TeacherOptions, create_teacher
from distill_app.teachers.remote import (
    check_endpoint,
    error_message,
    google_responses,
    parse_azure,
    parse_google,
    parse_hf,
    retry_after_seconds,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported

TOKEN = SERVER_TOKEN


def stats(server):
    return requests.get(server_url(server) + "/stats", timeout=5).json()


# --- hf ------------------------------------------------------------------------------------------


def test_hf_harvest_end_to_end(photos, start_server, monkeypatch):
    server = start_server()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = server_url(server) + "/models/acme/tiny"
    s = harvest(HarvestConfig(images=str(photos), teacher="hf:acme/tiny", endpoint=url, db="h.db",
                              top_k=3, wait_scale=0))
    assert s["teacher"] == "hf:acme/tiny"
    assert (s["sent"], s["succeeded"], s["failed"], s["requests"]) == (8, 8, 0, 8)

    store = open_store("h.db")
    teacher = store.find_teacher("hf:acme/tiny")
    assert teacher["score_kind"] == TOPK
    answers = store.answers(teacher["id"])
    assert len(answers) == 8
    for scores in answers.values():
        assert len(scores) == 3 and all(label.startswith("class_") for label, _ in scores)
        assert [s for _, s in scores] == sorted((s for _, s in scores), reverse=True)
        assert sum(s for _, s in scores) < 1  # top-k of a distribution: missing mass is known
    assert len({tuple(v) for v in answers.values()}) > 1  # the answers depend on the photo
    rows = store.db.execute("SELECT http_status, raw, attempts FROM responses").fetchall()
    assert {r[0] for r in rows} == {200} and {r[2] for r in rows} == {1}
    assert all(json.loads(r[1])[0]["label"].startswith("class_") for r in rows)  # raw kept as sent
    store.close()

    st_ = stats(server)
    assert st_["requests"] == 8 and st_["answered"] == 8 and st_["by_status"] == {"200": 8}
    assert sorted(st_["images"].values()) == [1] * 8


def test_hf_uploads_carry_no_metadata(tmp_path, start_server, monkeypatch):
    """What reaches the server is the re-encoded, downscaled photo, without EXIF (GPS)."""
    received = []
    server = start_server()
    original = server.service.classify
    server.service.classify = lambda uploads: received.extend(uploads) or original(uploads)
    folder = tmp_path / "gps"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}  # GPS IFD: latitude
    Image.new("RGB", (900, 600), (10, 120, 200)).save(folder / "a.jpg", exif=exif)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    harvest(HarvestConfig(images=str(folder), teacher="hf:acme/tiny", db="g.db",
                          endpoint=endpoints(server)["hf"], upload_size=300, wait_scale=0))
    [upload] = received
    assert b"SecretCam" not in upload
    with Image.open(io.BytesIO(upload)) as im:
        assert max(im.size) == 300 and not im.getexif()


def test_serve_teacher_hf_formats_and_auth(start_server):
    server = start_server()
    url = endpoints(server)["hf"]
    with open(write_photos(Path("p"), per_class=1) / "cat" / "cat-0.jpg", "rb") as f:
        image = f.read()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    raw = requests.post(url, data=image, headers={**auth, "Content-Type": "image/jpeg"}, timeout=5)
    assert raw.status_code == 200 and len(raw.json()) == 5  # the API's default top_k
    body = {"inputs": base64.b64encode(image).decode(), "parameters": {"top_k": 2}}
    as_json = requests.post(url, json=body, headers=auth, timeout=5)
    assert [a["label"] for a in as_json.json()] == [a["label"] for a in raw.json()[:2]]
    bad = requests.post(url, data=image, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert bad.status_code == 401 and bad.json() == {"error": "Invalid credentials in Authorization header"}
    junk = requests.post(url, data=b"not an image", headers=auth, timeout=5)
    assert junk.status_code == 400 and "decode" in junk.json()["error"]
    assert requests.post(server_url(server) + "/nowhere", data=b"x", timeout=5).status_code == 404


# --- google --------------------------------------------------------------------------------------


def test_google_harvest_batches_16_images_per_request(tmp_path, start_server, monkeypatch):
    images = write_photos(tmp_path / "many", per_class=20, size=32)  # 40 images
    server = start_server()
    monkeypatch.setenv("GOOGLE_API_KEY", TOKEN)
    s = harvest(HarvestConfig(images=str(images), teacher="google", endpoint=endpoints(server)["google"],
                              db="g.db", top_k=4, concurrency=2, wait_scale=0))
    assert s["succeeded"] == 40 and s["failed"] == 0
    assert s["requests"] == 3 and s["calls"] == 40  # 16 + 16 + 8 images
    st_ = stats(server)
    assert st_["requests"] == 3 and len(st_["images"]) == 40 and set(st_["images"].values()) == {1}

    store = open_store("g.db")
    teacher = store.find_teacher("google")
    assert teacher["score_kind"] == MULTILABEL
    raws = [json.loads(r[0]) for r in store.db.execute("SELECT raw FROM responses")]
    assert all(len(r["labelAnnotations"]) == 4 for r in raws)  # each image's own fragment
    assert all(TOKEN not in str(r) for r in raws)
    store.close()


def test_google_per_image_error_fails_only_that_image(tmp_path, start_server, monkeypatch):
    images = write_photos(tmp_path / "imgs", per_class=2, size=48)
    noise = Image.frombytes("RGB", (400, 400), os.urandom(400 * 400 * 3))
    noise.save(images / "cat" / "big-noise.jpg", quality=95)
    server = start_server(max_image_bytes=30_000)
    monkeypatch.setenv("GOOGLE_API_KEY", TOKEN)
    s = harvest(HarvestConfig(images=str(images), teacher="google", endpoint=endpoints(server)["google"],
                              db="g.db", wait_scale=0))
    assert s["requests"] == 1 and s["succeeded"] == 4 and s["failed"] == 1
    [reason] = s["failed_by_reason"]
    assert reason.startswith("Google error 3: Image too large")


def test_google_wrong_key_is_an_auth_error(start_server, monkeypatch):
    server = start_server()
    monkeypatch.setenv("GOOGLE_API_KEY", "wrong-key-for-google")
    teacher = create_teacher("google", TeacherOptions(endpoint=endpoints(server)["google"]))
    with pytest.raises(AuthError) as info:
        teacher.classify([b"\xff\xd8 not even a photo"])
    assert "GOOGLE_API_KEY" in str(info.value) and "wrong-key-for-google" not in str(info.value)
    assert "http" not in str(info.value)  # the URL (which holds the key) is never echoed


def test_google_key_never_reaches_the_debug_log(photos, start_server, monkeypatch, caplog):
    server = start_server()
    monkeypatch.setenv("GOOGLE_API_KEY", TOKEN)
    caplog.set_level("DEBUG", logger="urllib3")
    s = harvest(HarvestConfig(images=str(photos), teacher="google", endpoint=endpoints(server)["google"],
                              db="g.db", wait_scale=0))
    assert s["succeeded"] == 8
    assert "images:annotate?key=***" in caplog.text and TOKEN not in caplog.text


def test_wrong_url_stops_the_run_and_gives_claims_back(photos, start_server, monkeypatch):
    server = start_server()
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(DistillError, match="HTTP 404 .*check the teacher spec and --endpoint"):
        harvest(HarvestConfig(images=str(photos), teacher="hf:acme/tiny", db="u.db", wait_scale=0,
                              endpoint=server_url(server) + "/v2/wrong/path"))
    store = open_store("u.db")
    assert store.stats()["teachers"][0]["claimed"] == 0 and store.stats()["teachers"][0]["failed"] == 0
    store.close()


# --- azure ---------------------------------------------------------------------------------------


class FakeAzure(QuietHandler):
    """Azure AI Vision 4.0 analyze, tags only; records what it was sent."""

    seen: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        FakeAzure.seen.append((self.path, dict(self.headers), body))
        if self.headers.get("Ocp-Apim-Subscription-Key") != "azure-key-123":
            return self.reply(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
        if body.startswith(b"BAD"):
            return self.reply(400, {"error": {"code": "InvalidRequest", "message": "Image format is not valid.",
                                              "innererror": {"code": "InvalidImageFormat"}}})
        tags = [{"name": "cat", "confidence": 0.97}, {"name": "indoor", "confidence": 0.5}]
        self.reply(200, {"modelVersion": "2023-10-01", "metadata": {"width": 1, "height": 1},
                         "tagsResult": {"values": tags}})


@pytest.fixture
def fake_azure():
    FakeAzure.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAzure)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_azure_harvest_against_a_fake_azure(photos, fake_azure, monkeypatch):
    monkeypatch.setenv("AZURE_VISION_KEY", "azure-key-123")
    monkeypatch.setenv("AZURE_VISION_ENDPOINT", fake_azure + "/")
    s = harvest(HarvestConfig(images=str(photos), teacher="azure", db="a.db", wait_scale=0))
    assert s["succeeded"] == 8 and s["requests"] == 8
    path, headers, body = FakeAzure.seen[0]
    assert path == "/computervision/imageanalysis:analyze?api-version=2024-02-01&features=tags"
    assert headers["Content-Type"] == "application/octet-stream" and body[:2] == b"\xff\xd8"
    store = open_store("a.db")
    teacher = store.find_teacher("azure")
    assert teacher["score_kind"] == MULTILABEL
    assert set(map(tuple, store.answers(teacher["id"]).values())) == {(("cat", 0.97), ("indoor", 0.5))}
    store.close()


def test_azure_bad_image_and_bad_key(fake_azure, monkeypatch):
    monkeypatch.setenv("AZURE_VISION_KEY", "azure-key-123")
    monkeypatch.setenv("AZURE_VISION_ENDPOINT", fake_azure)
    teacher = create_teacher("azure", TeacherOptions(top_k=1))
    bad, good = teacher.classify([b"BAD image", b"\xff\xd8 fine"])
    assert not bad.ok and bad.http_status == 400 and bad.error == "HTTP 400: Image format is not valid."
    assert good.scores == [("cat", 0.97)] and good.http_status == 200  # top_k keeps the best
    monkeypatch.setenv("AZURE_VISION_KEY", "not-the-key")
    with pytest.raises(AuthError, match="set AZURE_VISION_KEY"):
        create_teacher("azure").classify([b"x"])


def test_azure_needs_its_endpoint(monkeypatch):
    monkeypatch.setenv("AZURE_VISION_KEY", "k" * 32)
    with pytest.raises(DistillError, match="AZURE_VISION_ENDPOINT"):
        create_teacher("azure")
    monkeypatch.setenv("AZURE_VISION_ENDPOINT", "https://res.cognitiveservices.azure.com/")
    teacher = create_teacher("azure")
    assert teacher.endpoint == ("https://res.cognitiveservices.azure.com/computervision/"
                                "imageanalysis:analyze?api-version=2024-02-01&features=tags")


# --- configuration -------------------------------------------------------------------------------


def test_defaults_keys_and_plain_http_only_to_loopback(monkeypatch):
    with pytest.raises(DistillError, match="HF_TOKEN"):
        create_teacher("hf:acme/model")
    with pytest.raises(DistillError, match="GOOGLE_API_KEY"):
        create_teacher("google")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("GOOGLE_API_KEY", TOKEN)
    assert create_teacher("hf:acme/model").endpoint == "https://router.huggingface.co/hf-inference/models/acme/model"
    assert create_teacher("google").endpoint == "https://vision.googleapis.com/v1/images:annotate"
    assert create_teacher("google").max_batch == 16
    for url in ("http://example.com/models/a/b", "http://10.0.0.5:8000/x", "http://127.example.com/"):
        with pytest.raises(DistillError, match="loopback") as info:
            create_teacher("hf:acme/model", TeacherOptions(endpoint=url))
        assert "/x" not in str(info.value) and "models" not in str(info.value)  # host only
    for url in ("http://127.0.0.1:8000/m", "http://127.3.4.5/m", "http://[::1]:8000/m",
                "http://localhost:8000/m", "https://example.com/m"):
        assert check_endpoint(url) == url
    for url in ("ftp://example.com/m", "example.com/m", "file:///etc/passwd"):
        with pytest.raises(DistillError, match="https://"):
            check_endpoint(url)
    with pytest.raises(DistillError, match="takes no name"):
        create_teacher("google:vision")
    with pytest.raises(DistillError, match="hf:OWNER/MODEL"):
        create_teacher("hf:")


def test_cli_serve_teacher_prints_urls_and_serves(teacher_spec):
    env = {**os.environ, "DISTILL_TEACHER_TOKEN": "cli-token-xyz", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "distill_app", "serve-teacher", "--teacher", teacher_spec,
         "--port", "0", "--format", "google"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stderr.readline()
        assert first.startswith("serving torchscript:") and "http://127.0.0.1:" in first
        base = first.split(" at ")[1].split()[0]
        lines = [proc.stderr.readline() for _ in range(2)]
        assert "--endpoint " + base + "/v1/images:annotate" in lines[0]
        assert "cli-token-xyz" not in first + "".join(lines)
        assert requests.post(base + "/models/a/b", data=b"x", timeout=5).status_code == 404  # --format
        denied = requests.post(base + "/v1/images:annotate?key=wrong", json={"requests": []}, timeout=5)
        assert denied.status_code == 403 and denied.json()["error"]["status"] == "PERMISSION_DENIED"
        assert requests.get(base + "/stats", timeout=5).json()["requests"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --- parsers -------------------------------------------------------------------------------------


def test_parse_hf():
    text = '[{"label": "tabby, tabby cat", "score": 0.25}, {"label": "tiger cat", "score": 0.7}]'
    assert parse_hf(text) == [("tiger cat", 0.7), ("tabby, tabby cat", 0.25)]
    assert parse_hf('[[{"label": "a", "score": 1}]]') == [("a", 1.0)]  # a batch of one
    for bad, why in [
        ('{"error": "Model is overloaded"}', "Model is overloaded"),
        ('[{"label": "a", "score": NaN}]', "outside"),
        ('[{"label": "a", "score": -0.1}]', "outside"),
        ('[{"label": "a", "score": 1.5}]', "outside"),
        ('[{"label": "a", "score": 0.7}, {"label": "b", "score": 0.6}]', "sum to"),
        ('[{"label": 3, "score": 0.5}]', "not a non-empty string"),
        ('[{"label": "a", "score": "0.5"}]', "not a number"),
        ('[{"label": "a", "score": true}]', "not a number"),
        ('[{"label": "a"}]', "label, score"),
        ("[]", "non-empty list"),
        ("<html>502 Bad Gateway</html>", "not JSON"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_hf(bad)


def test_parse_google_and_azure():
    fragment = {"labelAnnotations": [
        {"mid": "/m/01yrx", "description": "Cat", "score": 0.98, "topicality": 0.98},
        {"mid": "/m/0jbk", "description": "Whiskers", "score": 0.9, "topicality": 0.9},
        {"mid": "/m/x", "description": "Zero"},  # proto3 JSON omits zero values
    ]}
    assert parse_google(json.dumps(fragment)) == [("Cat", 0.98), ("Whiskers", 0.9), ("Zero", 0.0)]
    assert parse_google("{}") == []  # no labels found
    with pytest.raises(ValueError, match="Google error 3"):
        parse_google('{"error": {"code": 3, "message": "Bad image data."}}')
    with pytest.raises(ValueError, match="2 responses for 3 images"):
        google_responses('{"responses": [{}, {}]}', 3)
    assert google_responses('{"responses": [{}, {"labelAnnotations": []}]}', 2) == [{}, {"labelAnnotations": []}]
    assert parse_azure('{"tagsResult": {"values": [{"name": "dog", "confidence": 0.6}]}}') == [("dog", 0.6)]
    with pytest.raises(ValueError, match="tagsResult"):
        parse_azure('{"captionResult": {}}')


def test_error_messages_and_retry_after():
    assert error_message(b'{"error": {"code": 400, "message": "Request   payload\\ntoo big"}}') == \
        "Request payload too big"
    assert error_message('{"error": "Model x is currently loading", "estimated_time": 3}') == \
        "Model x is currently loading"
    assert len(error_message("<html>" + "x" * 1000)) == 160
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("-2") == 0.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 50 < retry_after_seconds(email.utils.formatdate(time.time() + 60, usegmt=True)) <= 61


# Any JSON value, with the shapes the parsers look for made likely.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["label", "score", "description", "name", "confidence", "error",
                         "labelAnnotations", "tagsResult", "values", "responses", "x"]),
        children, max_size=4),
    max_leaves=20,
)
label_lists = st.lists(st.fixed_dictionaries({"label": scalars, "score": scalars}), max_size=4)


def _valid_or_value_error(parser, text):
    try:
        result = parser(text)
    except ValueError:
        return
    assert isinstance(result, list)
    for label, score in result:
        assert isinstance(label, str) and label.strip()
        assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 1.0


near_valid = (
    label_lists  # hf
    | label_lists.map(lambda v: {"labelAnnotations": [{"description": d["label"], "score": d["score"]} for d in v]})
    | label_lists.map(lambda v: {"tagsResult": {"values": [{"name": d["label"], "confidence": d["score"]} for d in v]}})
)


@settings(max_examples=300, deadline=None)
@given(value=json_values | near_valid)
def test_parsers_give_valid_scores_or_value_error(value):
    text = json.dumps(value)  # NaN and Infinity included, as Python's json writes and reads them
    for parser in (parse_hf, parse_google, parse_azure):
        _valid_or_value_error(parser, text)
    try:
        google_responses(text, 1)
    except ValueError:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40) | st.binary(max_size=40))
def test_parsers_on_any_text_or_bytes(text):
    for parser in (parse_hf, parse_google, parse_azure):
        _valid_or_value_error(parser, text)


def test_parsers_survive_hostile_nesting():
    for parser in (parse_hf, parse_google, parse_azure):
        with pytest.raises(ValueError):
            parser("[" * 100_000)
