"""Keys leak through no output channel; TLS is verified; model files are loaded as data.

The main test runs every channel a key could escape through with distinctive keys in HF_TOKEN
and GOOGLE_API_KEY (Google's travels in the URL's query): harvests that stop on a wrong key,
that lose connections, time out, meet a server that echoes the request (URL with ``?key=``,
``Authorization`` header) into its error pages and labels, and an unexpected internal error
with DISTILL_DEBUG=1 (a traceback); then --json, train, `eval --report`, `cache export`. Log
records at DEBUG (urllib3's included), stdout, stderr and every byte of every file under the
test's folder (the database with its -wal and -shm, held open so they exist) are searched for
the keys.

Plain http:// to a non-loopback host is refused: tested in test_remote_teachers.py.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import shutil
import ssl
import subprocess
import threading
import traceback
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

from cache import open_store
from conftest import QuietHandler, save_tiny_teacher, write_photos
from distill_app.harvest import engine as harvest_module
from distill_app.harvest import pacing as pacing
from distill_app.training.checkpoint import read_student
from distill_app.cli import app
from distill_app.errors import DistillError
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.teachers.serve import ServeOptions, endpoints, serve, stop
from distill_app.teachers import TeacherOptions, create_teacher
from distill_app.teachers.local import read_state_dict

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported

HF_KEY = "hf_CanaryLeak7Qx2ZpW"
GOOGLE_KEY = "AIzaCanaryLeak-91_kqWx"
KEYS = (HF_KEY, GOOGLE_KEY)


def leaked(blob: bytes) -> list[str]:
    """The keys found in ``blob``, as written or URL-quoted."""
    return [k for k in KEYS if k.encode() in blob or quote(k, safe="").encode() in blob]


class Echo(QuietHandler):
    """A misbehaving proxy: echoes the request line (?key=) and Authorization header into its
    answers. POST /STATUS/...: that status; for 200, labels (hf) or a per-image error and labels
    (google) that carry the echo."""


    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        echo = f"{self.command} {self.path} Authorization: {self.headers.get('Authorization')}"
        status = int(self.path.split("/")[1])
        if status != 200:
            answer = {"error": {"code": status, "message": f"upstream said no to {echo}"}}
        elif self.path.startswith("/200/models/"):
            answer = [{"label": f"cat seen by {echo}", "score": 0.6}]
        else:
            n = len(json.loads(body)["requests"])
            answer = {"responses": [{"error": {"code": 3, "message": f"Bad image data: {echo}"}}] + [
                {"labelAnnotations": [{"description": f"Cat {echo}", "score": 0.9}]}] * (n - 1)}
        self.reply(status, answer)


@pytest.fixture
def servers(tmp_path):
    model = tmp_path / "tiny.pt"
    save_tiny_teacher(model)
    started = []

    def start(**kwargs):
        server, _ = serve(ServeOptions(teacher=f"torchscript:{model}", port=0, device="cpu", **kwargs))
        started.append(server)
        return endpoints(server)

    echo = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield start, f"http://127.0.0.1:{echo.server_address[1]}"
    echo.shutdown()
    echo.server_close()
    for server in started:
        stop(server)


class Channels:
    """Runs the CLI and keeps every byte it printed, by channel name."""

    def __init__(self, photos: Path):
        self.photos, self.runner = photos, CliRunner()
        self.outputs: list[tuple[str, bytes]] = []
        self.failure_reasons: list[str] = []

    def cli(self, name: str, args: list[str], exit_code: int = 0, env: dict | None = None):
        res = self.runner.invoke(app, args, env=env)
        self.outputs += [(name + " stdout", res.stdout_bytes), (name + " stderr", res.stderr_bytes)]
        if res.exc_info and not isinstance(res.exception, SystemExit):
            self.outputs.append((name + " exception", "".join(traceback.format_exception(*res.exc_info)).encode()))
        assert res.exit_code == exit_code, (name, res.output)
        if args[0] == "harvest" and exit_code == 0:
            self.failure_reasons += json.loads(res.stdout.splitlines()[-1])["failed_by_reason"]
        return res

    def harvest(self, name: str, teacher: str, endpoint: str, exit_code: int = 0, db: str = "s.db",
                env: dict | None = None):
        args = ["harvest", "--images", str(self.photos), "--teacher", teacher, "--endpoint", endpoint,
                "--db", db, "--json"]
        return self.cli(name, args, exit_code, env)


def test_keys_leak_through_no_channel(tmp_path, servers, monkeypatch, caplog):
    start, echo = servers
    monkeypatch.setenv("HF_TOKEN", HF_KEY)
    monkeypatch.setenv("GOOGLE_API_KEY", GOOGLE_KEY)
    # Every retry without sleeping, two attempts: the CLI has no flag for either.
    monkeypatch.setattr(harvest_module, "retry_policy", lambda *a, **k: pacing.retry_policy(2, wait_scale=0))
    caplog.set_level(logging.DEBUG)  # every logger, urllib3's request lines included
    run = Channels(write_photos(tmp_path / "photos", per_class=4, size=32))
    held = [open_store("s.db"), open_store("echo.db")]  # held open: the -wal and -shm files stay

    _wrong_keys_timeouts_and_drops(run, start)
    _a_proxy_that_echoes_the_request(run, echo, held[1])
    for db in glob.glob("*.db*"):  # the failures as stored, before later runs replace them
        run.outputs.append((f"{db} after the failures", Path(db).read_bytes()))
    _an_unexpected_internal_error(run, start, monkeypatch)
    _good_runs_then_train_eval_report_and_cache(run, start, tmp_path)

    reasons = " | ".join(run.failure_reasons)  # every kind of failure was met and stored
    for reason in ("connection dropped", "timeout", "HTTP 400: upstream said no", "HTTP 503",
                   "Google error 3: Bad image data: POST /200/v1/images:annotate?key=***"):
        assert reason in reasons, (reason, reasons)
    assert len(glob.glob("*.db-wal")) == len(glob.glob("*.db-shm")) == 2
    for record in caplog.records:
        run.outputs.append((f"log {record.name}", logging.Formatter("%(message)s").format(record).encode()))
    assert any(name == "log urllib3.connectionpool" and b"key=***" in blob for name, blob in run.outputs)
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and not path.is_symlink():
            run.outputs.append((str(path.relative_to(tmp_path)), path.read_bytes()))
    for store in held:
        store.close()

    found = {name: leaked(blob) for name, blob in run.outputs if leaked(blob)}
    assert not found, f"keys leaked through: {found}"
    assert len(run.outputs) > 60  # the search really covered the channels


def _wrong_keys_timeouts_and_drops(run: Channels, start) -> None:
    wrong = start(token="the-server-expects-another-key")
    for teacher, fmt in (("hf:acme/tiny", "hf"), ("google", "google")):
        res = run.harvest(f"wrong key {fmt}", teacher, wrong[fmt], exit_code=1)
        assert "rejected the key" in res.stderr  # the run stops at once, naming the variable

    slow = start(token=GOOGLE_KEY, latency_ms=600)  # the CLI has no --timeout: the library
    s = harvest(HarvestConfig(images=str(run.photos), teacher="google", endpoint=slow["google"],
                              db="s.db", timeout=0.2, max_attempts=2, wait_scale=0))
    assert s["failed"] == 8 and list(s["failed_by_reason"]) == ["timeout (gave up after 2 attempts)"], s
    run.failure_reasons += s["failed_by_reason"]
    run.outputs.append(("timeout summary", json.dumps(s).encode()))

    hf_drops = start(token=HF_KEY, fail_rate=0.5, fail_modes=("drop",), seed=1)
    google_drops = start(token=GOOGLE_KEY, fail_rate=1.0, fail_modes=("drop",))
    run.harvest("drops hf", "hf:acme/tiny", hf_drops["hf"])
    run.harvest("drops google", "google", google_drops["google"])


def _a_proxy_that_echoes_the_request(run: Channels, echo: str, store) -> None:
    """200, 400, 503, then 401 and 404, into a store of its own (google's first image of each
    batch fails, so each run has something to send)."""
    for status in (200, 400, 503, 401, 404):
        for teacher, path in ((f"hf:echo/s{status}", "/models/echo/model"), ("google", "/v1/images:annotate")):
            run.harvest(f"echo {status} {teacher}", teacher, f"{echo}/{status}{path}",
                        exit_code=1 if status in (401, 404) else 0, db="echo.db")
    echoed = store.db.execute("SELECT scores FROM responses WHERE scores LIKE '%?key=***%'").fetchall()
    assert echoed  # the echoed key was replaced in the labels themselves


def _an_unexpected_internal_error(run: Channels, start, monkeypatch) -> None:
    """With DISTILL_DEBUG=1: a traceback, chained to an error whose message holds URL and key."""

    def bug(*args, **kwargs):
        try:
            raise requests.ConnectionError(f"Max retries exceeded with url: /v1/images:annotate?key={GOOGLE_KEY}")
        except requests.ConnectionError as e:
            raise RuntimeError(f"internal bug near 'Authorization: Bearer {HF_KEY}'") from e

    with monkeypatch.context() as m:
        m.setattr(harvest_module, "_attempt", bug)
        (run.photos / "cat" / "new.png").write_bytes(_png())  # something left to send
        res = run.harvest("internal error", "google", start(token=GOOGLE_KEY)["google"], exit_code=1,
                          env={"DISTILL_DEBUG": "1"})
    assert "Traceback" in res.stderr and "unexpected RuntimeError" in res.stderr and "***" in res.stderr


def _good_runs_then_train_eval_report_and_cache(run: Channels, start, tmp_path: Path) -> None:
    done = json.loads(run.harvest("good hf", "hf:acme/tiny", start(token=HF_KEY)["hf"]).stdout.splitlines()[-1])
    assert done["failed"] == 0 and done["succeeded"] + done["already_cached"] == done["images"]
    run.harvest("good google", "google", start(token=GOOGLE_KEY)["google"])
    run.cli("train", ["train", "--images", str(run.photos), "--db", "s.db", "--teacher", "hf:acme/tiny",
                      "--width", "0.35", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
                      "--max-classes", "4", "--out", "run", "--json"])
    run.cli("eval", ["eval", "--student", "run", "--images", str(run.photos), "--db", "s.db",
                     "--report", "report", "--json"])
    assert (tmp_path / "report" / "report.md").exists()
    for args in (["cache", "export"], ["cache", "stats", "--json"], ["cache", "labels", "--teacher", "google"]):
        run.cli(" ".join(args), args + ["--db", "s.db"])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


# --- TLS -----------------------------------------------------------------------------------------


class Recorder(QuietHandler):
    posts: list = []

    def do_POST(self):
        Recorder.posts.append(self.path)
        self.reply(200, b"{}")


@pytest.fixture
def self_signed_https(tmp_path):
    """https://127.0.0.1:PORT with a self-signed certificate (made by the openssl binary)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl binary to make a certificate with")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    Recorder.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tls_is_verified_and_a_self_signed_server_is_refused_clearly(photos, self_signed_https, monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", GOOGLE_KEY)
    endpoint = self_signed_https + "/v1/images:annotate"
    teacher = create_teacher("google", TeacherOptions(endpoint=endpoint))
    assert teacher._session().verify is True
    teacher.close()

    res = CliRunner().invoke(app, ["harvest", "--images", str(photos), "--teacher", "google",
                                   "--endpoint", endpoint, "--db", "t.db", "--json"])
    assert res.exit_code == 1, res.output
    [line] = [x for x in res.stderr.splitlines() if x.startswith("Error")]
    assert "TLS certificate of 127.0.0.1 is not trusted" in line and "self-signed" in line, line
    assert not leaked(res.stdout_bytes + res.stderr_bytes) and res.stdout.strip() == ""
    assert Recorder.posts == []  # nothing went over the unverified connection
    store = open_store("t.db")
    counts = store.stats()["teachers"][0]
    assert counts["claimed"] == 0 and counts["failed"] == 0  # not the images' fault; rerun goes on
    store.close()

    with pytest.raises(DistillError) as info:  # the library says the same, and chains nothing
        harvest(HarvestConfig(images=str(photos), teacher="google", endpoint=endpoint, db="t.db"))
    text = "".join(traceback.format_exception(info.value))
    assert "not trusted" in text and not leaked(text.encode()) and urlsplit(endpoint).path not in text


# --- model files ---------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_are_loaded_as_data_never_as_code(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "model.pt"
    torch.save({"format": 1, "state_dict": {"w": torch.zeros(1)}, "extra": Payload(str(marker))}, evil)
    with pytest.raises(DistillError, match="cannot read"):
        read_student(evil)  # student files: eval, export, prune
    with pytest.raises(DistillError, match="cannot read checkpoint"):
        read_state_dict(str(evil))  # timm:NAME:CHECKPOINT teachers
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the same file, trusted: it does run code
    assert marker.exists()
