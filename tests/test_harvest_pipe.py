"""The harvest keeps the pipe full: a retry waits off its slot, a 429 slows everyone, an all-503
phase pauses everyone, and --rate auto finds the server's limit. Real loopback servers, real
waits (short ones), the real local or tiny teacher."""

import base64
import io
import json
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from conftest import SERVER_TOKEN, QuietHandler, write_photos
from distill_app.cli import app
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.harvest.pacing import RateLimiter
from distill_app.teachers.serve import endpoints, server_url

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported

HF_ANSWER = [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}]


@pytest.fixture
def hf_key(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SERVER_TOKEN)


class Recorder:
    """Events of a constructed server, with their times; one lock for all handler threads."""

    def __init__(self):
        self.events: list[tuple[float, str]] = []
        self.lock = threading.Lock()

    def add(self, what: str) -> None:
        with self.lock:
            self.events.append((time.monotonic(), what))


def start_hf(behaviour, recorder: Recorder):
    """A loopback server speaking the hf wire format; ``behaviour(handler, image)`` replies."""

    class Handler(QuietHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            image = Image.open(io.BytesIO(base64.b64decode(body["inputs"]))).convert("RGB")
            behaviour(self, image, recorder)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/models/acme/tiny"


def solid_photos(root, n: int, bad_colour=None):
    """``n`` photos of distinct grey levels, plus one of ``bad_colour`` if given."""
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (40 + 4 * i, 40 + 4 * i, 40 + 4 * i)).save(root / f"p{i}.png")
    if bad_colour:
        Image.new("RGB", (32, 32), bad_colour).save(root / "bad.png")
    return root


def is_red(image) -> bool:
    r, g, b = image.getpixel((16, 16))
    return r > 200 and g < 50


def test_a_retry_does_not_hold_its_slot(tmp_path, hf_key):
    """One image always fails slowly; while it waits for its retry both slots carry the others."""

    def behaviour(handler, image, rec):
        if is_red(image):
            rec.add("bad start")
            time.sleep(0.2)
            rec.add("bad end")
            handler.send_response(503)
            handler.send_header("Retry-After", "1")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        rec.add("good start")
        time.sleep(0.1)
        rec.add("good end")
        handler.reply(200, HF_ANSWER)

    rec = Recorder()
    server, url = start_hf(behaviour, rec)
    images = solid_photos(tmp_path / "imgs", 40, bad_colour=(255, 0, 0))
    s = harvest(HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=url, db="r.db",
                              concurrency=2, max_attempts=3))
    server.shutdown()
    assert s["succeeded"] == 40 and s["failed"] == 1
    assert s["failed_by_reason"] == {"HTTP 503 (gave up after 3 attempts)": 1}
    # While the bad image waits for its retry (between a reply and its next attempt), how many
    # good requests are in flight at once? Holding the slot would make it at most 1.
    in_flight, waiting, most = 0, False, 0
    for _, what in sorted(rec.events):
        if what == "bad end":
            waiting = True
        elif what == "bad start":
            waiting = False
        elif what == "good start":
            in_flight += 1
            most = max(most, in_flight) if waiting else most
        elif what == "good end":
            in_flight -= 1
    assert most == 2


def test_an_all_503_phase_pauses_every_sender(tmp_path, hf_key):
    """The model loads for 1.5 s: every call gets 503 estimated_time 0.5; senders pause together
    instead of spending the phase sending every waiting image into it."""
    began = []

    def behaviour(handler, image, rec):
        began.append(began[0] if began else time.monotonic())
        if time.monotonic() - began[0] < 1.5:
            rec.add("503")
            handler.reply(503, {"error": "Model acme/tiny is currently loading", "estimated_time": 0.5})
        else:
            handler.reply(200, HF_ANSWER)

    rec = Recorder()
    server, url = start_hf(behaviour, rec)
    images = solid_photos(tmp_path / "imgs", 40)
    s = harvest(HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=url, db="p.db",
                              concurrency=4, max_attempts=8))
    server.shutdown()
    assert s["succeeded"] == 40 and s["failed"] == 0
    loading = sum(1 for _, what in rec.events if what == "503")
    # 4 senders, a pause of 0.5 s each time all of them got a 503: about 4 x 3 calls. Without the
    # pause the senders would go on to the other waiting images, each of them answered 503.
    assert 4 <= loading <= 4 * 5, loading
    assert s["paused_s"] >= 1.0


def test_a_503_among_answers_is_only_a_retry(tmp_path, hf_key):
    def behaviour(handler, image, rec):
        if is_red(image) and not rec.events:
            rec.add("503")
            handler.reply(503, {"error": "Model acme/tiny is currently loading", "estimated_time": 0.2})
        else:
            handler.reply(200, HF_ANSWER)

    rec = Recorder()
    server, url = start_hf(behaviour, rec)
    images = solid_photos(tmp_path / "imgs", 20, bad_colour=(255, 0, 0))
    s = harvest(HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=url, db="o.db",
                              concurrency=4))
    server.shutdown()
    assert s["succeeded"] == 21 and s["requests"] == 22 and s["paused_s"] == 0


def test_429s_slow_the_shared_pacer(tmp_path, start_server, hf_key):
    """--rate 40 against a server that allows 10/s: the pacer comes down to what is let through."""
    server = start_server(rate=10)
    images = write_photos(tmp_path / "imgs", per_class=20, size=32)  # 40 images
    s = harvest(HarvestConfig(images=str(images), teacher="hf:acme/tiny", endpoint=endpoints(server)["hf"],
                              db="t.db", rate=40, concurrency=4, max_attempts=20))
    assert s["succeeded"] == 40 and s["throttled"] > 0
    assert s["final_rate"] < 15  # cut from 40 towards the 10 the server lets through
    counts = requests.get(server_url(server) + "/stats", timeout=5).json()
    assert set(counts["images"].values()) == {1} and counts["by_status"]["200"] == 40


def test_rate_auto_finds_the_servers_limit(tmp_path, start_server, hf_key):
    server = start_server(rate=20)
    images = write_photos(tmp_path / "imgs", per_class=75, size=32)  # 150 images
    res = CliRunner().invoke(app, ["harvest", "--images", str(images), "--teacher", "hf:acme/tiny",
                                   "--endpoint", endpoints(server)["hf"], "--db", "a.db", "--rate", "auto",
                                   "--concurrency", "4", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.splitlines()[-1])
    assert s["succeeded"] == 150 and s["failed"] == 0
    assert s["throttled"] > 0 and 12 <= s["final_rate"] <= 26, s  # found ~20, by 429s it counted
    assert "times HTTP 429, pacing at" in res.stderr
    counts = requests.get(server_url(server) + "/stats", timeout=5).json()
    assert set(counts["images"].values()) == {1}


def test_rate_flag_is_a_number_or_auto(photos):
    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--rate", "fast"])
    assert res.exit_code == 1 and "--rate must be a positive number of requests per second or 'auto'" in res.output
    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--rate", "0"])
    assert res.exit_code == 1 and "got 0.0" in res.output


def test_rate_limiter_cuts_by_what_the_server_let_through_and_grows_back():
    at_limit = RateLimiter(20.0)
    for _ in range(20):  # all 20 sent in the last second were taken: the 429 is a boundary hit
        at_limit.acquire()
        at_limit.admitted()
    at_limit.throttled()
    at_limit.throttled()  # the other calls in flight at the same overshoot: no second cut
    assert at_limit.throttles == 2 and at_limit.rate == pytest.approx(0.97 * 20)
    cut = at_limit.rate
    time.sleep(0.3)
    at_limit.acquire()  # a caller waits for its slot: the rate binds, so it may grow
    at_limit.admitted()
    assert cut < at_limit.rate <= 20.0

    over = RateLimiter(40.0)
    for _ in range(16):  # 16 taken where 40 a second were sent: the server's limit is lower
        over.acquire()
        over.admitted()
    over.throttled()
    assert over.rate == pytest.approx(0.85 * 16, rel=0.05)


def test_local_teacher_reports_images_per_second_and_loading_apart(photos):
    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--db", "l.db", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.splitlines()[-1])
    assert s["images_per_s"] > 0 and s["load_s"] > 0
    assert "images/s (model loaded in" in res.stderr and "requests/s" not in res.stderr
