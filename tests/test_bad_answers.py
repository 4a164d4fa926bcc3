"""Bad answers from a paid API, end to end: a harvest against a loopback server that answers
canned bodies in the hf and google wire formats; what lands in the real SQLite store.

Every malformed answer (an HTML page served with 200, truncated JSON, the wrong schema, an empty
list, NaN, scores below 0 or above 1, a label that is not a string) is stored as status
'failed' with its reason, and never reaches ``store.answers()`` (what training reads); a later
run retries it.

Decisions for answers that are odd but valid (asserted below):

- 10,000 labels: a valid answer (hf: a distribution whose mass is <= 1; google: independent
  scores). Stored whole, as answered: the teacher said it, we paid for it, and targets.py only
  keeps the labels a class maps. A flood of labels is not a reason to pay again.
- Labels with odd characters (newline, tab, RTL override, Hebrew, emoji, NUL, padding spaces):
  labels are the teacher's vocabulary, opaque strings; any non-blank string is valid. Stored
  ok and read back byte for byte (the scores column is JSON, so a NUL is an escape, never a
  raw byte that could cut a C string). Blank labels are refused.
- An empty list: for hf a failure (an image classifier always ranks at least one class). For
  google, ``{}`` for an image is Cloud Vision's proto3 way of saying "no labels found": a valid,
  paid-for answer, stored ok with no labels; targets.py drops the row (all-zero target), so it
  never trains anything. ``{"responses": []}`` for one image sent is a failure.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cache import open_store
from conftest import QuietHandler
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.data.targets import build_targets
from distill_app.teachers import AuthError, TeacherOptions, TransientError, create_teacher

KEY = "canned-key-3f9a"
ODD_LABELS = ["line\nbreak", "tab\there", "\u202eRTL override", "חתול", "🐱 cat 🐈‍⬛",
              "nul\u0000byte", "  padded  ", "quote \" and \\ backslash", "<script>x</script>"]


class Canned(QuietHandler):
    """Answers every POST with the server's ``canned`` (status, body); counts the requests."""


    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = self.server.canned
        self.server.requests += 1
        data = body if isinstance(body, bytes) else body.encode()
        self.reply(status, data, "text/html" if data.lstrip().startswith(b"<") else "application/json")


@pytest.fixture(scope="module")
def canned_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    server.daemon_threads = True
    server.canned, server.requests = (200, "[]"), 0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def answer_with(canned_server, monkeypatch):
    """answer_with(body, status=200) -> {"hf": url, "google": url}; keys set for both."""
    monkeypatch.setenv("HF_TOKEN", KEY)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)

    def set_answer(body, status=200):
        canned_server.canned, canned_server.requests = (status, body), 0
        base = f"http://127.0.0.1:{canned_server.server_address[1]}"
        return {"hf": f"{base}/models/acme/odd", "google": f"{base}/v1/images:annotate"}

    return set_answer


def _images(tmp_path, n=1):
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 24), (40 * i, 90, 200)).save(folder / f"{i}.png")
    return folder


def _harvest(tmp_path, fmt, urls, n_images=1):
    teacher = "hf:acme/odd" if fmt == "hf" else "google"
    cfg = HarvestConfig(images=str(_images(tmp_path, n_images)), teacher=teacher, endpoint=urls[fmt],
                        db="a.db", wait_scale=0, max_attempts=2)
    return harvest(cfg)


def _rows(teacher_spec):
    store = open_store("a.db")
    teacher = store.find_teacher(teacher_spec)
    rows = store.db.execute("SELECT status, http_status, error, scores, raw FROM responses").fetchall()
    answers = store.answers(teacher["id"])
    store.close()
    return teacher, rows, answers


def _hf(pairs):
    return json.dumps([{"label": lab, "score": s} for lab, s in pairs], allow_nan=True)


def _google(*fragments):
    return json.dumps({"responses": list(fragments)}, allow_nan=True)


def _labels(pairs):
    return {"labelAnnotations": [{"mid": f"/m/{i}", "description": lab, "score": s, "topicality": s}
                                 for i, (lab, s) in enumerate(pairs)]}


HTML_PAGE = "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"

# (format, case name, body, reason the stored failure starts with)
FAILURES = [
    ("hf", "html page with 200", HTML_PAGE, "malformed answer (gave up after 2 attempts)"),
    ("hf", "truncated json", '[{"label": "tabby", "score": 0.9}, {"label": "tig', "malformed answer (gave up"),
    ("hf", "wrong schema", '{"predictions": [{"class": "cat", "p": 0.9}]}', "malformed answer: expected a non-empty list"),
    ("hf", "azure schema", '[{"name": "cat", "confidence": 0.9}]', "malformed answer: expected {label, score}"),
    ("hf", "empty list", "[]", "malformed answer: expected a non-empty list"),
    ("hf", "error object with 200", '{"error": "Model acme/odd is overloaded"}', "malformed answer: error in answer"),
    ("hf", "NaN score", _hf([("cat", math.nan)]), "malformed answer: score nan"),
    ("hf", "Infinity score", _hf([("cat", math.inf)]), "malformed answer: score inf"),
    ("hf", "negative score", _hf([("cat", 0.5), ("dog", -0.1)]), "malformed answer: score -0.1"),
    ("hf", "score above 1", _hf([("cat", 1.5)]), "malformed answer: score 1.5"),
    ("hf", "scores sum above 1", _hf([("cat", 0.7), ("dog", 0.6)]), "malformed answer: top-k probabilities sum"),
    ("hf", "score as a string", _hf([("cat", "0.9")]), "malformed answer: score '0.9'"),
    ("hf", "blank label", _hf([("  ", 0.9)]), "malformed answer: label '  '"),
    ("hf", "label not a string", '[{"label": 7, "score": 0.9}]', "malformed answer: label 7"),
    ("google", "html page with 200", HTML_PAGE, "malformed answer (gave up after 2 attempts)"),
    ("google", "truncated json", '{"responses": [{"labelAnnotations": [{"descr', "malformed answer (gave up"),
    ("google", "wrong schema", '{"results": [{"labels": ["cat"]}]}', 'malformed answer: expected {"responses"'),
    ("google", "empty responses list", _google(), "malformed answer: 0 responses for 1 images"),
    ("google", "NaN score", _google(_labels([("Cat", math.nan)])), "malformed answer: score nan"),
    ("google", "negative score", _google(_labels([("Cat", -0.5)])), "malformed answer: score -0.5"),
    ("google", "score above 1", _google(_labels([("Cat", 1.01)])), "malformed answer: score 1.01"),
    ("google", "labels not a list", _google({"labelAnnotations": {"Cat": 0.9}}), "malformed answer: labelAnnotations"),
    ("google", "no description", _google({"labelAnnotations": [{"mid": "/m/1", "score": 0.9}]}),
     "malformed answer: expected {description, score}"),
    ("google", "per-image error", _google({"error": {"code": 3, "message": "Bad image data."}}),
     "Google error 3: Bad image data."),
]


@pytest.mark.parametrize("fmt, case, body, reason", FAILURES, ids=[f"{f}-{c}" for f, c, _, _ in FAILURES])
def test_bad_answer_is_a_stored_failure_never_a_target(tmp_path, answer_with, fmt, case, body, reason):
    urls = answer_with(body)
    s = _harvest(tmp_path, fmt, urls)
    assert (s["succeeded"], s["failed"]) == (0, 1), s
    [stored_reason] = s["failed_by_reason"]
    assert stored_reason.startswith(reason), stored_reason
    teacher, rows, answers = _rows("hf:acme/odd" if fmt == "hf" else "google")
    [(status, http_status, error, scores, raw)] = rows
    assert (status, http_status, scores) == ("failed", 200, None)
    assert error == stored_reason and "\n" not in error and KEY not in error
    assert answers == {}  # what training reads: nothing
    if "gave up" in reason:  # not JSON at all: retried (max_attempts), then a failure
        assert s["requests"] == 2
    else:  # JSON of the wrong shape: no retry, the evidence is kept (bounded)
        assert s["requests"] == 1 and raw and len(raw) <= 4000


def test_failed_answers_are_retried_by_a_later_run(tmp_path, answer_with):
    urls = answer_with(_hf([("cat", math.nan)]))
    assert _harvest(tmp_path, "hf", urls)["failed"] == 1
    answer_with(_hf([("cat", 0.75), ("dog", 0.25)]))
    again = _harvest(tmp_path, "hf", urls)
    assert (again["already_cached"], again["sent"], again["succeeded"]) == (0, 1, 1)
    _, rows, answers = _rows("hf:acme/odd")
    assert [r[0] for r in rows] == ["ok"] and list(answers.values()) == [[("cat", 0.75), ("dog", 0.25)]]


def test_one_bad_fragment_in_a_google_batch_fails_only_its_image(tmp_path, answer_with):
    body = _google(_labels([("Cat", 0.9)]), _labels([("Cat", math.nan)]),
                   {"error": {"code": 13, "message": "Internal error."}})
    s = _harvest(tmp_path, "google", answer_with(body), n_images=3)
    assert (s["requests"], s["succeeded"], s["failed"]) == (1, 1, 2)
    _, rows, answers = _rows("google")
    assert sorted(r[0] for r in rows) == ["failed", "failed", "ok"]
    assert list(answers.values()) == [[("Cat", 0.9)]]


# --- odd but valid ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hf", "google"])
def test_ten_thousand_labels_are_a_valid_answer_stored_whole(tmp_path, answer_with, fmt):
    pairs = [(f"label {i:05d}", round(1e-4 * (1 - i / 20_000), 9)) for i in range(10_000)]
    body = _hf(pairs) if fmt == "hf" else _google(_labels(pairs))
    s = _harvest(tmp_path, fmt, answer_with(body))
    assert (s["succeeded"], s["failed"], s["requests"]) == (1, 0, 1)
    teacher, rows, answers = _rows("hf:acme/odd" if fmt == "hf" else "google")
    [scores] = answers.values()
    assert scores == pairs  # descending already: stored as answered, all of them
    assert rows[0][0] == "ok" and len(rows[0][4]) > 300_000  # the raw answer is kept whole
    shas, targets = build_targets(answers, teacher["score_kind"], ["label 00000", "label 00001"], other=True)
    assert targets.shape == (1, 3) and abs(targets.sum() - 1) < 1e-5


@pytest.mark.parametrize("fmt", ["hf", "google"])
def test_labels_with_odd_characters_round_trip_exactly(tmp_path, answer_with, fmt):
    pairs = [(label, round(0.1 - i * 0.01, 3)) for i, label in enumerate(ODD_LABELS)]
    body = _hf(pairs) if fmt == "hf" else _google(_labels(pairs))
    s = _harvest(tmp_path, fmt, answer_with(body))
    assert (s["succeeded"], s["failed"]) == (1, 0)
    teacher, rows, answers = _rows("hf:acme/odd" if fmt == "hf" else "google")
    assert list(answers.values()) == [pairs]
    assert "\x00" not in rows[0][3]  # JSON column: the NUL is escaped, never a raw byte
    shas, targets = build_targets(answers, teacher["score_kind"], ODD_LABELS)
    assert len(shas) == 1 and targets[0].argmax() == 0  # labels map exactly, as answered


def test_google_no_labels_is_a_valid_answer_that_trains_nothing(tmp_path, answer_with):
    s = _harvest(tmp_path, "google", answer_with(_google({})))
    assert (s["succeeded"], s["failed"]) == (1, 0)  # paid for and answered: never sent again
    teacher, rows, answers = _rows("google")
    assert rows[0][0] == "ok" and list(answers.values()) == [[]]
    shas, targets = build_targets(answers, teacher["score_kind"], ["Cat", "Dog"], other=True)
    assert shas == [] and targets.shape == (0, 3)  # an all-zero target is dropped


# --- any body through the real HTTP path ---------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["label", "score", "description", "labelAnnotations", "responses", "error"]),
        children, max_size=3),
    max_leaves=12,
)
bodies = (json_values.map(lambda v: json.dumps(v, allow_nan=True))
          | json_values.map(lambda v: json.dumps({"responses": [v]}, allow_nan=True))
          | st.text(max_size=30) | st.binary(max_size=30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, status=st.sampled_from([200, 200, 200, 400, 422]))
def test_any_answer_is_valid_scores_a_reasoned_failure_or_a_retry(answer_with, body, status):
    urls = answer_with(body, status)
    for fmt in ("hf", "google"):
        teacher = create_teacher("hf:acme/odd" if fmt == "hf" else "google",
                                 TeacherOptions(endpoint=urls[fmt], timeout=5))
        try:
            [answer] = teacher.classify([b"\x89PNG any upload"])
        except TransientError as e:  # not JSON: retried by the harvest, then a failure
            assert status == 200 and e.reason == "malformed answer"
            continue
        except AuthError:  # Cloud Vision's way of saying "wrong key": stops the run, on purpose
            raw = body if isinstance(body, bytes) else body.encode()
            assert fmt == "google" and status == 400
            assert b"API_KEY_INVALID" in raw or b"API key not valid" in raw
            continue
        finally:
            teacher.close()
        if answer.ok:
            assert status == 200 and isinstance(answer.scores, list)
            for label, score in answer.scores:
                assert isinstance(label, str) and label.strip()
                assert isinstance(score, float) and 0.0 <= score <= 1.0
        else:
            assert answer.error and "\n" not in answer.error and answer.http_status == status
