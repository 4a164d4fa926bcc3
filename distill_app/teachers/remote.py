"""Remote teachers: Hugging Face, Google Cloud Vision and Azure AI Vision, over HTTPS.

Each provider is a small class (how to build its request, which variable holds its key) plus a
pure parser from answer text to ``(label, score)`` pairs; the parsers are property-tested (any
text gives a valid list or ValueError). :class:`RemoteTeacher` holds what they share: one
requests.Session per thread, timeouts, TLS verification, no redirects, and how each outcome
maps onto what the harvest does with it:

===============================================  =============================================
401, 403                                         AuthError: the run stops, naming the variable
3xx, 404, 405                                    DistillError: the URL is wrong, the run stops
a TLS certificate that does not verify           DistillError: the run stops (never unverified)
408, 425, 429, 5xx, timeout, dropped connection  TransientError: retried (Retry-After honoured)
200 with a body that is not JSON                 TransientError "malformed answer"
other 4xx (400, 413, 415...)                     failed Answers for that request's images
JSON of the wrong shape, scores outside [0, 1]   failed Answer "malformed answer: ..."
===============================================  =============================================

Failed answers are stored as failures (never used as targets) and a later run retries them.
Keys come from the environment and stay on the instance. Google's key travels in the URL's
query, so no URL is ever put in an error message, and urllib3's debug log is redacted.
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import ipaddress
import json
import logging
import math
import os
import re
import threading
import time
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from ..errors import DistillError, one_line
from .base import MULTILABEL, TOPK, Answer, AuthError, Teacher, TeacherOptions, TransientError
from .base import get_key, register

HF_DEFAULT_URL = "https://router.huggingface.co/hf-inference/models/{model}"
GOOGLE_DEFAULT_URL = "https://vision.googleapis.com/v1/images:annotate"
AZURE_PATH = "/computervision/imageanalysis:analyze?api-version=2024-02-01&features=tags"
HF_TOP_K = 5  # the Inference API's own default
GOOGLE_MAX_RESULTS = 10  # Cloud Vision's own default for LABEL_DETECTION
GOOGLE_MAX_BATCH = 16  # images per images:annotate request (Cloud Vision's limit)
CONNECT_TIMEOUT_S = 10.0
MAX_MESSAGE_CHARS = 160
MAX_FAILED_RAW_CHARS = 4000  # an HTML error page is evidence, not something to keep whole
SUM_TOLERANCE = 1e-3  # top-k probabilities from float32 softmaxes may sum to 1.0004
RETRY_STATUSES = {408, 425, 429}  # plus every 5xx
WRONG_URL_STATUSES = {404, 405}


class Unparseable(ValueError):
    """The body is not JSON at all (a proxy's HTML page, a cut connection): worth a retry."""


# --- parsers: text -> [(label, score)], descending; ValueError for anything else ----------------


def parse_hf(text: str | bytes) -> list[tuple[str, float]]:
    """Hugging Face image-classification answer ``[{"label", "score"}, ...]`` (top-k of a softmax)."""
    data = _loads(text)
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]  # some deployments wrap one image's answer in a batch of one
    if isinstance(data, dict) and "error" in data:
        raise ValueError(f"error in answer: {_short_message(str(data['error']))}")
    if not isinstance(data, list) or not data:
        raise ValueError(f"expected a non-empty list of {{label, score}}, got {_kind(data)}")
    pairs = []
    for item in data:
        if not isinstance(item, dict) or "label" not in item or "score" not in item:
            raise ValueError(f"expected {{label, score}} objects, got {_kind(item)}")
        pairs.append((item["label"], item["score"]))
    scores = _checked(pairs)
    total = math.fsum(s for _, s in scores)
    if total > 1 + SUM_TOLERANCE:
        raise ValueError(f"top-k probabilities sum to {total:.4f} > 1")
    return scores


def google_responses(text: str | bytes, n_images: int) -> list[dict]:
    """The per-image entries of a Cloud Vision ``images:annotate`` answer, one per image sent."""
    data = _loads(text)
    items = data.get("responses") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"expected {{\"responses\": [...]}}, got {_kind(data)}")
    if len(items) != n_images:
        raise ValueError(f"{len(items)} responses for {n_images} images")
    if not all(isinstance(item, dict) for item in items):
        raise ValueError("every response must be an object")
    return items


def google_image_error(item: dict) -> str | None:
    """``"Google error 3: Bad image data."`` for a per-image error entry, else None."""
    error = item.get("error")
    if error is None:
        return None
    if isinstance(error, dict):
        return f"Google error {error.get('code', '?')}: {_short_message(str(error.get('message', '')))}"
    return f"Google error: {_short_message(str(error))}"


def parse_google(text: str | bytes) -> list[tuple[str, float]]:
    """One image's entry ``{"labelAnnotations": [{mid, description, score, topicality}]}``.

    Multi-label scores (they do not sum to 1). Cloud Vision writes proto3 JSON, which omits
    zero values: a missing ``score`` is 0 and a missing ``labelAnnotations`` means no labels.
    """
    data = _loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected an object, got {_kind(data)}")
    if "error" in data:
        raise ValueError(google_image_error(data) or "error entry")
    labels = data.get("labelAnnotations", [])
    if not isinstance(labels, list):
        raise ValueError(f"labelAnnotations must be a list, got {_kind(labels)}")
    pairs = []
    for item in labels:
        if not isinstance(item, dict) or "description" not in item:
            raise ValueError(f"expected {{description, score}} objects, got {_kind(item)}")
        pairs.append((item["description"], item.get("score", 0.0)))
    return _checked(pairs)


def parse_azure(text: str | bytes) -> list[tuple[str, float]]:
    """Azure AI Vision 4.0 ``{"tagsResult": {"values": [{"name", "confidence"}]}}`` (multi-label)."""
    data = _loads(text)
    result = data.get("tagsResult") if isinstance(data, dict) else None
    values = result.get("values") if isinstance(result, dict) else None
    if not isinstance(values, list):
        raise ValueError(f"expected {{\"tagsResult\": {{\"values\": [...]}}}}, got {_kind(data)}")
    pairs = []
    for item in values:
        if not isinstance(item, dict) or "name" not in item or "confidence" not in item:
            raise ValueError(f"expected {{name, confidence}} objects, got {_kind(item)}")
        pairs.append((item["name"], item["confidence"]))
    return _checked(pairs)


def error_message(text: str | bytes) -> str:
    """A short one-line message from an error body: ``error`` / ``error.message`` or the text."""
    try:
        data = _loads(text)
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error.get("code")
        elif error is not None:
            message = error
        else:
            message = data.get("message")
    if message is None:
        message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return _short_message(str(message)) or "no message"


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) in seconds from now; None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        seconds = (when - dt.datetime.now(dt.timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _loads(text: str | bytes) -> Any:
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except RecursionError:  # "[[[[...": a hostile body must not crash the harvest
        raise Unparseable("answer nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise Unparseable(f"not JSON: {type(e).__name__}") from None


def _checked(pairs: list[tuple[Any, Any]]) -> list[tuple[str, float]]:
    """Labels non-empty strings, scores finite numbers in [0, 1]; sorted by descending score."""
    out = []
    for label, score in pairs:
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"label {_short_repr(label)} is not a non-empty string")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"score {_short_repr(score)} for {_short_repr(label)} is not a number")
        if isinstance(score, int) and score not in (0, 1):  # float(10**400) would overflow
            raise ValueError(f"score {_short_repr(score)} for {_short_repr(label)} is outside [0, 1]")
        value = float(score)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"score {value} for {_short_repr(label)} is outside [0, 1]")
        out.append((label, value))
    out.sort(key=lambda pair: -pair[1])
    return out


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _short_message(text: str) -> str:
    return one_line(text, MAX_MESSAGE_CHARS)


# --- endpoints --------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str) -> str:
    """``url`` if it is https, or plain http to a loopback host; else a DistillError.

    The message names the host only: a URL may carry a key in its query.
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise DistillError("--endpoint is not a valid URL: write https://HOST/PATH") from None
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        if is_loopback(host):
            return url
        raise DistillError(
            f"plain http:// is allowed only to loopback addresses (127.0.0.1, ::1, localhost), "
            f"not {host}: use https://, or an SSH tunnel to reach a server on another machine"
        )
    raise DistillError(f"--endpoint must be an https:// URL, got scheme {parts.scheme or 'none'!r}")


class _RedactKeys(logging.Filter):
    """urllib3 logs request lines at DEBUG, Google's ``?key=`` included: blank the value."""

    pattern = re.compile(r"([?&]key=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "key=" in message:
            record.msg, record.args = self.pattern.sub(r"\1***", message), ()
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactKeys())


# --- the shared HTTP client ---------------------------------------------------------------------


class RemoteTeacher(Teacher):
    """HTTP, status handling and failed answers shared by the cloud providers."""

    remote = True
    provider = "the teacher"  # for messages: "Hugging Face rejected the key"

    def __init__(self, spec: str, endpoint: str, key: str, options: TeacherOptions):
        if options.top_k is not None and options.top_k < 1:
            raise DistillError(f"--top-k must be at least 1, got {options.top_k}")
        if not options.timeout > 0:
            raise DistillError(f"timeout must be positive, got {options.timeout}")
        self.spec = spec
        self.endpoint = check_endpoint(endpoint)
        self.options = options
        self._key = key
        # requests.Session is not documented as thread-safe: one per harvest thread.
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        # Proxy variables and ~/.netrc must not redirect or decorate calls to a loopback server.
        self._trust_env = not is_loopback(urlsplit(self.endpoint).hostname or "")

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = self._trust_env
            with self._sessions_lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def _post(self, n_images: int, **kwargs) -> tuple[requests.Response, float]:
        """POST to the endpoint; returns (response, latency per image in ms) for a 2xx or a 4xx
        that concerns the images. Raises TransientError, AuthError or DistillError otherwise."""
        start = time.perf_counter()
        timeout = (min(CONNECT_TIMEOUT_S, self.options.timeout), self.options.timeout)
        try:
            # The body is read inside post() (stream=False), so a cut mid-body lands here too.
            resp = self._session().post(self.endpoint, timeout=timeout, allow_redirects=False,
                                        **kwargs)
        except requests.Timeout:
            raise TransientError("timeout") from None
        except requests.exceptions.SSLError as e:
            self._check_tls(e)
            raise TransientError("connection dropped") from None
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            refused = "refused" in str(e) or "NewConnectionError" in str(e)
            raise TransientError("connection refused" if refused else "connection dropped") from None
        except requests.RequestException as e:
            raise TransientError(f"request failed: {type(e).__name__}") from None
        latency_ms = (time.perf_counter() - start) * 1000.0 / max(n_images, 1)
        self._check_status(resp)
        return resp, latency_ms

    def _check_tls(self, error: requests.exceptions.SSLError) -> None:
        """A certificate that does not verify stops the run: retrying cannot fix it, and
        verification is never turned off. Other TLS errors (a cut handshake) are transient.
        The message names the host and the reason only: str(error) holds the URL (and key)."""
        why = re.search(r"certificate verify failed: ([^(\"]+?)\.?\s*(?:\(_ssl|\"|\)|$)", str(error))
        if why is None:
            return
        host = urlsplit(self.endpoint).hostname
        raise DistillError(
            f"{self.spec}: the TLS certificate of {host} is not trusted ({why.group(1).strip()}); "
            "distill always verifies certificates: use one signed by a trusted CA "
            "(REQUESTS_CA_BUNDLE=FILE adds a CA), or plain http:// to a server on loopback"
        ) from None

    def _check_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        if status in (401, 403) or self._key_rejected(resp):
            raise AuthError(
                f"{self.provider} rejected the key (HTTP {status}: {self._message(resp)}): "
                f"set {self.key_env_var} to a valid key"
            )
        if 300 <= status < 400:
            raise DistillError(f"{self.spec}: the endpoint answered with a redirect (HTTP {status}); "
                               "pass the final URL with --endpoint")
        if status in WRONG_URL_STATUSES:
            raise DistillError(f"{self.spec}: HTTP {status} from the endpoint ({self._message(resp)}); "
                               "check the teacher spec and --endpoint")
        if status in RETRY_STATUSES or status >= 500:
            raise TransientError(f"HTTP {status}", retry_after=self._retry_after(resp), status=status)

    def _key_rejected(self, resp: requests.Response) -> bool:
        """Providers that say "bad key" with another status override this."""
        return False

    def _retry_after(self, resp: requests.Response) -> float | None:
        return retry_after_seconds(resp.headers.get("Retry-After"))

    def _message(self, resp: requests.Response) -> str:
        return self._redact(error_message(resp.content))

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if len(self._key) >= 4 else text

    def _failed(self, resp: requests.Response, n: int, latency_ms: float) -> list[Answer]:
        """A 4xx about the images themselves: each of them fails, the run goes on."""
        reason = f"HTTP {resp.status_code}: {self._message(resp)}"
        raw = self._redact(_text(resp)[:MAX_FAILED_RAW_CHARS])
        return [Answer(None, raw=raw, http_status=resp.status_code, error=reason,
                       latency_ms=latency_ms) for _ in range(n)]

    def _answer(self, parse, text: str, status: int, latency_ms: float) -> Answer:
        """Parse one image's answer text: garbage is transient, a wrong shape fails the image."""
        try:
            scores = parse(text)
        except Unparseable:
            raise TransientError("malformed answer", status=status) from None
        except ValueError as e:
            return Answer(None, raw=self._redact(text[:MAX_FAILED_RAW_CHARS]), http_status=status,
                          error=f"malformed answer: {self._redact(str(e))}", latency_ms=latency_ms)
        if self.options.top_k:
            scores = scores[: self.options.top_k]
        # A proxy that echoes the request (Google's ?key=) must not put the key in a stored label.
        # Labels, not the text before parsing: a short key could otherwise cut the JSON itself.
        scores = [(self._redact(label), score) for label, score in scores]
        return Answer(scores, raw=self._redact(text), http_status=status, latency_ms=latency_ms)


def _text(resp: requests.Response) -> str:
    # JSON is UTF-8 (RFC 8259); requests' charset guessing is slow and may guess wrong.
    return resp.content.decode("utf-8", "replace")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _no_name(provider: str, name: str) -> None:
    if name.strip():
        raise DistillError(f"the {provider} teacher takes no name: write --teacher {provider}")


# --- hf:OWNER/MODEL -----------------------------------------------------------------------------


class HFTeacher(RemoteTeacher):
    """Hugging Face Inference API, image-classification task: one image per request."""

    score_kind = TOPK
    key_env_var = "HF_TOKEN"
    provider = "Hugging Face"
    max_batch = 1

    def __init__(self, model: str, options: TeacherOptions):
        model = model.strip().strip("/")
        if not model:
            raise DistillError("hf teacher needs a model: hf:OWNER/MODEL, e.g. hf:google/vit-base-patch16-224")
        endpoint = options.endpoint or HF_DEFAULT_URL.format(model=quote(model, safe="/"))
        super().__init__(f"hf:{model}", endpoint, get_key(self.key_env_var), options)
        self.top_k = options.top_k or HF_TOP_K

    def classify(self, images: list[bytes]) -> list[Answer]:
        """One request per image (callers send max_batch = 1); see the module table for errors."""
        return [self._classify_one(upload) for upload in images]

    def _classify_one(self, upload: bytes) -> Answer:
        body = {"inputs": _b64(upload), "parameters": {"top_k": self.top_k}}
        resp, latency_ms = self._post(1, json=body, headers={"Authorization": f"Bearer {self._key}"})
        if resp.status_code >= 400:
            return self._failed(resp, 1, latency_ms)[0]
        return self._answer(parse_hf, _text(resp), resp.status_code, latency_ms)

    def _retry_after(self, resp: requests.Response) -> float | None:
        # 503 while the model loads: {"error": "Model ... is currently loading", "estimated_time": 20.0}
        try:
            estimated = json.loads(resp.content).get("estimated_time")
        except (ValueError, AttributeError, RecursionError):
            estimated = None
        if isinstance(estimated, (int, float)) and not isinstance(estimated, bool) \
                and math.isfinite(estimated):
            return max(0.0, float(estimated))
        return super()._retry_after(resp)


@register("hf")
def hf_teacher(name: str, options: TeacherOptions) -> HFTeacher:
    return HFTeacher(name, options)


# --- google -------------------------------------------------------------------------------------


class GoogleTeacher(RemoteTeacher):
    """Cloud Vision ``images:annotate`` with LABEL_DETECTION: up to 16 images per request."""

    score_kind = MULTILABEL
    key_env_var = "GOOGLE_API_KEY"
    provider = "Google Cloud Vision"
    max_batch = GOOGLE_MAX_BATCH

    def __init__(self, options: TeacherOptions):
        endpoint = options.endpoint or GOOGLE_DEFAULT_URL
        super().__init__("google", endpoint, get_key(self.key_env_var), options)
        self.max_results = options.top_k or GOOGLE_MAX_RESULTS

    def classify(self, images: list[bytes]) -> list[Answer]:
        """One request per 16 images; per-image ``error`` entries fail only their image."""
        answers: list[Answer] = []
        for lo in range(0, len(images), self.max_batch):
            answers += self._classify_batch(images[lo : lo + self.max_batch])
        return answers

    def _classify_batch(self, uploads: list[bytes]) -> list[Answer]:
        feature = {"type": "LABEL_DETECTION", "maxResults": self.max_results}
        body = {"requests": [{"image": {"content": _b64(u)}, "features": [feature]} for u in uploads]}
        # The key goes in the query (Cloud Vision's API-key convention); see the module docstring.
        resp, latency_ms = self._post(len(uploads), json=body, params={"key": self._key})
        if resp.status_code >= 400:
            return self._failed(resp, len(uploads), latency_ms)
        try:
            items = google_responses(resp.content, len(uploads))
        except Unparseable:
            raise TransientError("malformed answer", status=resp.status_code) from None
        except ValueError as e:
            reason = f"malformed answer: {self._redact(str(e))}"
            raw = self._redact(_text(resp)[:MAX_FAILED_RAW_CHARS])
            return [Answer(None, raw=raw, http_status=resp.status_code, error=reason,
                           latency_ms=latency_ms) for _ in uploads]
        answers = []
        for item in items:
            raw = json.dumps(item, ensure_ascii=False)  # this image's fragment of the answer
            error = google_image_error(item)
            if error is not None:
                answers.append(Answer(None, raw=self._redact(raw), http_status=resp.status_code,
                                      error=self._redact(error), latency_ms=latency_ms))
            else:
                answers.append(self._answer(parse_google, raw, resp.status_code, latency_ms))
        return answers

    def _key_rejected(self, resp: requests.Response) -> bool:
        # Cloud Vision answers a wrong key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        return resp.status_code == 400 and (b"API_KEY_INVALID" in resp.content
                                            or b"API key not valid" in resp.content)


@register("google")
def google_teacher(name: str, options: TeacherOptions) -> GoogleTeacher:
    _no_name("google", name)
    return GoogleTeacher(options)


# --- azure --------------------------------------------------------------------------------------


class AzureTeacher(RemoteTeacher):
    """Azure AI Vision 4.0 image analysis, ``features=tags``: raw bytes, one image per request."""

    score_kind = MULTILABEL
    key_env_var = "AZURE_VISION_KEY"
    endpoint_env_var = "AZURE_VISION_ENDPOINT"
    provider = "Azure AI Vision"
    max_batch = 1

    def __init__(self, options: TeacherOptions):
        endpoint = options.endpoint or self._default_endpoint()
        super().__init__("azure", endpoint, get_key(self.key_env_var), options)

    def _default_endpoint(self) -> str:
        base = os.environ.get(self.endpoint_env_var, "").strip().rstrip("/")
        if not base:
            raise DistillError(
                f"the azure teacher needs its resource URL: set {self.endpoint_env_var} to "
                "https://<resource>.cognitiveservices.azure.com (or pass --endpoint)"
            )
        return base + AZURE_PATH

    def classify(self, images: list[bytes]) -> list[Answer]:
        return [self._classify_one(upload) for upload in images]

    def _classify_one(self, upload: bytes) -> Answer:
        headers = {"Ocp-Apim-Subscription-Key": self._key, "Content-Type": "application/octet-stream"}
        resp, latency_ms = self._post(1, data=upload, headers=headers)
        if resp.status_code >= 400:
            return self._failed(resp, 1, latency_ms)[0]
        return self._answer(parse_azure, _text(resp), resp.status_code, latency_ms)


@register("azure")
def azure_teacher(name: str, options: TeacherOptions) -> AzureTeacher:
    _no_name("azure", name)
    return AzureTeacher(options)
