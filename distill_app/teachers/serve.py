"""`distill serve-teacher`: a local teacher behind the wire formats of the `hf` and `google` providers.

POST /models/OWNER/MODEL     hf: raw image bytes, or {"inputs": base64, "parameters": {"top_k": K}}
POST /v1/images:annotate     google: {"requests": [{"image": {"content": base64}, "features": [...]}]}
GET  /stats                  counts: requests, answered, by status, model calls per uploaded image

For self-hosting a big teacher on one GPU box for many harvesters, for demos, and for the tests
and benchmarks of the HTTP path, with optional auth, rate limiting, latency and failure
injection. The served model runs one batch at a time under a lock; everything else (auth, the
rate window, latency sleeps) runs on the connection threads.

Why the standard library's ThreadingHTTPServer and not a web framework: no extra dependency,
and one thread per connection is plenty when the model is the bottleneck and serialised anyway.
It has no TLS: remote teachers speak plain http only to loopback, so reach it from other
machines through an SSH tunnel or a TLS-terminating proxy.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import json
import logging
import math
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import DistillError
from . import Answer, Teacher, TeacherOptions, create_teacher
from .remote import GoogleTeacher, HFTeacher

# serve-teacher's own key (--token), read from the environment like the providers' keys.
TOKEN_ENV_VAR = "DISTILL_TEACHER_TOKEN"

log = logging.getLogger("distill.server")

FORMATS = ("hf", "google")
FAIL_MODES = ("loading", "error", "drop", "garbage")  # 503, 500, closed socket, 200 with junk
HF_TOP_K = 5  # the Inference API's default
GOOGLE_MAX_RESULTS = 10  # Cloud Vision's default
GOOGLE_MAX_IMAGES = 16  # per images:annotate request, as Cloud Vision
LOADING_ESTIMATED_TIME_S = 0.05
MAX_BODY_BYTES = 64 * 1024 * 1024
GARBAGE = b'{"label": "tench, Tinca tinca", "sco'  # a body cut short, served with 200
GOOGLE_BAD_KEY = {"error": {"code": 403, "message": "The request is missing a valid API key.",
                            "status": "PERMISSION_DENIED"}}


@dataclass
class ServeOptions:
    """What `distill serve-teacher` serves and how it misbehaves on purpose."""

    teacher: str  # a local teacher spec: local, timm:NAME[:CKPT], torchscript:PATH
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (see server.server_address)
    formats: tuple[str, ...] = FORMATS
    token: str | None = None  # hf: "Authorization: Bearer TOKEN"; google: "?key=TOKEN"
    rate: float | None = None  # requests/s over a sliding window; more get 429 + Retry-After
    latency_ms: float = 0.0  # added to every admitted request
    fail_rate: float = 0.0  # probability that an admitted request fails (one of fail_modes)
    fail_modes: tuple[str, ...] = FAIL_MODES
    fail_mix: dict[str, float] | None = None  # mode -> probability, instead of fail_rate/fail_modes
    loading_s: float = LOADING_ESTIMATED_TIME_S  # the estimated_time of a 503 "loading"
    seed: int = 0  # of the failure draws, so a run's sequence of failures is repeatable
    max_image_bytes: int | None = None  # bigger uploads fail alone: hf 400, google error entry
    device: str = "auto"

    def check(self) -> None:
        bad_formats = set(self.formats) - set(FORMATS)
        if not self.formats or bad_formats:
            raise DistillError(f"--format must be one of {', '.join(FORMATS)}, got {', '.join(self.formats)}")
        bad_modes = set(self.fail_modes) - set(FAIL_MODES)
        if not self.fail_modes or bad_modes:
            raise DistillError(f"fail modes must be among {', '.join(FAIL_MODES)}, got {sorted(bad_modes)}")
        mix = self.fail_mix or {}
        if set(mix) - set(FAIL_MODES) or any(not 0 <= p <= 1 for p in mix.values()) or sum(mix.values()) > 1:
            raise DistillError(f"--fail-mix takes MODE=P pairs, modes among {', '.join(FAIL_MODES)}, "
                               f"probabilities summing to at most 1; got {mix}")
        if not self.loading_s >= 0:
            raise DistillError(f"--loading-s must be 0 or more, got {self.loading_s}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise DistillError(f"--fail-rate must be between 0 and 1, got {self.fail_rate}")
        if self.rate is not None and not self.rate > 0:
            raise DistillError(f"--rate must be positive, got {self.rate}")
        if not self.latency_ms >= 0:
            raise DistillError(f"--latency-ms must be 0 or more, got {self.latency_ms}")
        if not 0 <= self.port <= 65535:
            raise DistillError(f"--port must be 0-65535, got {self.port}")


class TeacherService:
    """The served teacher and the server's shared state: rate window, failure draws, counters."""

    def __init__(self, options: ServeOptions, teacher: Teacher):
        self.options, self.teacher = options, teacher
        labels = getattr(teacher, "labels", None) or []
        self._label_index = {label: i for i, label in reversed(list(enumerate(labels)))}
        self._model_lock = threading.Lock()
        self._lock = threading.Lock()
        self._rng = random.Random(options.seed)
        self._window: collections.deque[float] = collections.deque()
        self.requests = 0
        self.answered = 0
        self.model_seconds = 0.0  # time inside the model: is the teacher the bottleneck?
        self.by_status: collections.Counter = collections.Counter()
        self.images: collections.Counter = collections.Counter()

    def count(self, outcome: str | int) -> None:
        with self._lock:
            self.by_status[str(outcome)] += 1

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def admit(self) -> float | None:
        """None when the request may go on, else the seconds until it could (rate limit)."""
        if not self.options.rate:
            return None
        window_s = max(1.0, 1.0 / self.options.rate)  # below 1/s: one request per 1/rate s
        limit = max(1, int(self.options.rate * window_s + 1e-9))
        with self._lock:
            now = time.monotonic()
            while self._window and self._window[0] <= now - window_s:
                self._window.popleft()
            if len(self._window) >= limit:
                return self._window[0] + window_s - now
            self._window.append(now)
            return None

    def draw_failure(self) -> str | None:
        mix = self.options.fail_mix
        if not mix and not self.options.fail_rate:
            return None
        with self._lock:  # one seeded sequence of draws, whatever the thread
            draw = self._rng.random()
            if mix:
                for mode, p in mix.items():
                    if draw < p:
                        return mode
                    draw -= p
                return None
            if draw >= self.options.fail_rate:
                return None
            return self._rng.choice(self.options.fail_modes)

    def classify(self, uploads: list[bytes]) -> list[Answer]:
        """Run the model on ``uploads`` (one batch, under the lock) and count the calls."""
        with self._model_lock:
            start = time.perf_counter()
            answers = self.teacher.classify(uploads)
            model_s = time.perf_counter() - start
        with self._lock:
            self.answered += 1
            self.model_seconds += model_s
            for data in uploads:
                self.images[hashlib.sha256(data).hexdigest()] += 1
        return answers

    def label_id(self, label: str) -> str:
        """A stable knowledge-graph-like ``mid`` for a label (Cloud Vision's answers carry one)."""
        index = self._label_index.get(label)
        if index is None:
            return "/distill/" + hashlib.sha1(label.encode()).hexdigest()[:8]
        return f"/distill/{index}"

    def stats(self) -> dict:
        with self._lock:
            return {"teacher": self.teacher.spec, "requests": self.requests, "answered": self.answered,
                    "model_seconds": round(self.model_seconds, 3), "by_status": dict(self.by_status),
                    "images": dict(self.images)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client must not keep the process alive on Ctrl-C
    service: TeacherService

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up (killed harvester, client timeout) is routine, not a traceback.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: harvesters reuse their connections
    server_version = "distill-serve-teacher"
    server: _Server

    # -- routing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        svc = self.server.service
        if path == "/stats":
            self._json(200, svc.stats(), counted=False)
        elif path in ("/", "/health"):
            self._json(200, {"teacher": svc.teacher.spec, "formats": list(svc.options.formats)},
                       counted=False)
        else:
            self._json(404, {"error": "Not Found"}, counted=False)

    def do_POST(self) -> None:
        svc = self.server.service
        parts = urlsplit(self.path)
        route = self._route(parts.path)
        svc.count_request()
        body = self._read_body()
        if body is None:
            return
        if route is None:
            self._json(404, {"error": "Not Found"})
            return
        try:
            self._serve(route, parts.query, body)
        except Exception as exc:  # a bug or a model failure: the client sees a 500, not a hang
            log.warning("serve-teacher: %s: %s", type(exc).__name__, exc)
            self._json(500, {"error": f"Internal Server Error: {type(exc).__name__}"})

    def _route(self, path: str) -> str | None:
        formats = self.server.service.options.formats
        if "hf" in formats and path.startswith("/models/") and len(path) > len("/models/"):
            return "hf"
        if "google" in formats and path == "/v1/images:annotate":
            return "google"
        return None

    def _serve(self, route: str, query: str, body: bytes) -> None:
        svc, opts = self.server.service, self.server.service.options
        if opts.token and not self._authorized(route, query):
            if route == "hf":
                self._json(401, {"error": "Invalid credentials in Authorization header"})
            else:
                self._json(403, GOOGLE_BAD_KEY)
            return
        wait = svc.admit()
        if wait is not None:
            self._rate_limited(route, wait)
            return
        if opts.latency_ms:
            time.sleep(opts.latency_ms / 1000.0)
        failure = svc.draw_failure()
        if failure:
            self._fail(route, failure)
        elif route == "hf":
            self._hf(body)
        else:
            self._google(body)

    def _authorized(self, route: str, query: str) -> bool:
        token = self.server.service.options.token or ""
        if route == "hf":
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
        given = (parse_qs(query).get("key") or [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    # -- the two wire formats ------------------------------------------------------------------

    def _hf(self, body: bytes) -> None:
        try:
            upload, top_k = hf_request(body, self.headers.get("Content-Type", ""))
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
            return
        too_big = self._too_big(upload)
        if too_big:
            self._json(400, {"error": too_big})
            return
        [answer] = self.server.service.classify([upload])
        if not answer.ok:
            self._json(400, {"error": answer.error or "cannot process image"})
            return
        self._json(200, [{"label": label, "score": score} for label, score in answer.scores[:top_k]])

    def _google(self, body: bytes) -> None:
        try:
            items = google_request(body)
        except ValueError as exc:
            self._json(400, {"error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}})
            return
        responses: list[dict] = [{} for _ in items]
        todo = []  # (index, upload, max_results) of the images the model will see
        for i, (upload, max_results) in enumerate(items):
            problem = "Bad image data." if upload is None else self._too_big(upload)
            if problem:
                responses[i] = {"error": {"code": 3, "message": problem}}
            elif max_results:
                todo.append((i, upload, max_results))
        if todo:
            answers = self.server.service.classify([upload for _, upload, _ in todo])
            for (i, _, max_results), answer in zip(todo, answers):
                responses[i] = self._google_labels(answer, max_results)
        self._json(200, {"responses": responses})

    def _google_labels(self, answer: Answer, max_results: int) -> dict:
        if not answer.ok:
            return {"error": {"code": 3, "message": "Bad image data."}}
        svc = self.server.service
        return {"labelAnnotations": [
            {"mid": svc.label_id(label), "description": label, "score": score, "topicality": score}
            for label, score in answer.scores[:max_results]
        ]}

    def _too_big(self, upload: bytes) -> str | None:
        limit = self.server.service.options.max_image_bytes
        if limit is not None and len(upload) > limit:
            return f"Image too large: {len(upload)} bytes, this server takes at most {limit}"
        return None

    # -- misbehaviour on purpose ---------------------------------------------------------------

    def _rate_limited(self, route: str, wait_s: float) -> None:
        retry_after = {"Retry-After": str(max(1, math.ceil(wait_s)))}
        if route == "hf":
            body: dict = {"error": "Rate limit reached. You reached the request limit of this server, "
                                   "retry later."}
        else:
            body = {"error": {"code": 429, "message": "Quota exceeded for requests per second.",
                              "status": "RESOURCE_EXHAUSTED"}}
        self._json(429, body, retry_after)

    def _fail(self, route: str, mode: str) -> None:
        if mode == "drop":  # close the socket without a word: the client sees a dropped connection
            self.server.service.count("dropped")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif mode == "garbage":
            self._send(200, GARBAGE, "application/json")
        elif mode == "loading":
            model = urlsplit(self.path).path.removeprefix("/models/")
            if route == "hf":
                self._json(503, {"error": f"Model {model} is currently loading",
                                 "estimated_time": self.server.service.options.loading_s})
            else:
                self._json(503, {"error": {"code": 503, "message": "The service is currently unavailable.",
                                           "status": "UNAVAILABLE"}})
        else:
            self._json(500, {"error": "Internal Server Error"})

    # -- plumbing ------------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._json(411, {"error": "Content-Length required"})
            return None
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._json(413, {"error": f"Request body over {MAX_BODY_BYTES} bytes"})
            return None
        return self.rfile.read(int(length))

    def _json(self, status: int, obj, headers: dict | None = None, counted: bool = True) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers, counted)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None,
              counted: bool = True) -> None:
        if counted:  # by_status counts the answers to POSTs (teacher calls), not GET /stats
            self.server.service.count(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to tell it

    def log_request(self, code="-", size="-") -> None:
        # Not the request line: it holds Google's ?key= when a token is set.
        log.debug("%s %s %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        log.debug("serve-teacher: " + format, *args)


def hf_request(body: bytes, content_type: str) -> tuple[bytes, int]:
    """(image bytes, top_k) from an hf request body: raw bytes, or JSON with base64 ``inputs``."""
    if not (content_type.startswith("application/json") or body[:1] == b"{"):
        return body, HF_TOP_K
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("Body is not valid JSON") from None
    inputs = data.get("inputs") if isinstance(data, dict) else None
    if not isinstance(inputs, str):
        raise ValueError("Expected {\"inputs\": <base64 image>}")
    params = data.get("parameters") or {}
    top_k = params.get("top_k", HF_TOP_K) if isinstance(params, dict) else None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError("parameters.top_k must be a positive integer")
    return _b64decode(inputs.split("base64,", 1)[-1]), top_k


def google_request(body: bytes) -> list[tuple[bytes | None, int]]:
    """[(image bytes or None when undecodable, maxResults or 0 without LABEL_DETECTION)]."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("Invalid JSON payload received.") from None
    entries = data.get("requests") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError("Expected {\"requests\": [...]} with at least one request.")
    if len(entries) > GOOGLE_MAX_IMAGES:
        raise ValueError(f"At most {GOOGLE_MAX_IMAGES} images are allowed per request.")
    items = []
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {}
        image = entry.get("image") if isinstance(entry.get("image"), dict) else {}
        content = image.get("content")
        try:
            upload = _b64decode(content) if isinstance(content, str) else None
        except ValueError:
            upload = None
        max_results = 0
        for feature in entry.get("features") or []:
            if isinstance(feature, dict) and feature.get("type") == "LABEL_DETECTION":
                wanted = feature.get("maxResults", GOOGLE_MAX_RESULTS)
                max_results = wanted if isinstance(wanted, int) and wanted > 0 else GOOGLE_MAX_RESULTS
        items.append((upload, max_results))
    return items


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("inputs is not valid base64") from None


# --- starting and stopping ----------------------------------------------------------------------


def serve(options: ServeOptions) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Load the teacher, listen, and serve on a daemon thread; returns (server, thread).

    ``options.port = 0`` picks a free port: read it from ``server.server_address[1]``.
    Stop with :func:`stop`.
    """
    options.check()
    teacher = create_teacher(options.teacher, TeacherOptions(device=options.device))
    if teacher.remote:
        raise DistillError(f"serve-teacher serves local teachers (local, timm:NAME, torchscript:PATH), "
                           f"not {teacher.spec}")
    if hasattr(teacher, "load"):
        teacher.load()  # a missing or broken model fails now, not on the first request
    server_class = _Server6 if ":" in options.host else _Server
    try:
        server = server_class((options.host, options.port), _Handler)
    except OSError as e:
        teacher.close()
        raise DistillError(f"cannot listen on {options.host}:{options.port} ({e.strerror}); "
                           "pick another --port or --host") from None
    server.service = TeacherService(options, teacher)
    # poll_interval: how long stop() may wait; 0.1 s costs nothing measurable when idle.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="serve-teacher", daemon=True)
    thread.start()
    return server, thread


def stop(server: ThreadingHTTPServer) -> None:
    """Stop serving, close the socket and release the model."""
    server.shutdown()
    server.server_close()
    server.service.teacher.close()


def server_url(server: ThreadingHTTPServer) -> str:
    """``http://HOST:PORT`` of a running server."""
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}"


def endpoints(server: ThreadingHTTPServer) -> dict[str, str]:
    """Wire format -> the URL to pass as ``distill harvest --endpoint``."""
    base, formats = server_url(server), server.service.options.formats
    urls = {"hf": f"{base}/models/local/teacher", "google": f"{base}/v1/images:annotate"}
    return {fmt: url for fmt, url in urls.items() if fmt in formats}


def run_forever(options: ServeOptions, announce: Callable[[str], None]) -> None:
    """Serve until Ctrl-C; ``announce`` gets the lines telling where (the CLI prints them)."""
    server, thread = serve(options)
    announce(f"serving {server.service.teacher.spec} at {server_url(server)} (Ctrl-C stops)")
    for fmt, url in endpoints(server).items():
        key = {"hf": HFTeacher.key_env_var, "google": GoogleTeacher.key_env_var}[fmt]
        teacher = "hf:local/teacher" if fmt == "hf" else "google"
        auth = f" with {key}=<token>" if options.token else f" ({key} may be any non-empty value)"
        announce(f"  {fmt:<6} distill harvest --teacher {teacher} --endpoint {url}{auth}")
    announce(f"  stats  {server_url(server)}/stats")
    try:
        while thread.is_alive():
            thread.join(0.5)  # a timed join lets Ctrl-C through
    except KeyboardInterrupt:
        announce("stopping")
    finally:
        stop(server)
