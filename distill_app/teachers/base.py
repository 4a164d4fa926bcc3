"""The teacher interface and its registry.

A teacher turns image bytes into ``(label, score)`` lists and says what kind of scores they are.
Built-in providers register through :func:`register`, the same hook a plugin would use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DistillError

# What the scores of an answer mean; decides how they become training targets (targets.py).
DISTRIBUTION = "distribution"  # a full softmax: scores sum to ~1
TOPK = "topk"  # the top k entries of a distribution: 1 - sum(scores) is known missing mass
MULTILABEL = "multilabel"  # independent per-label confidences in [0, 1]; no sum constraint


@dataclass
class Answer:
    """One image's answer from a teacher.

    ``scores`` is None when the call failed; then ``error`` says why (one line, no secrets).
    """

    scores: list[tuple[str, float]] | None
    raw: str | None = None
    http_status: int | None = None
    error: str | None = None
    latency_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.scores is not None


@dataclass
class TeacherOptions:
    """Everything a provider may need besides its name; unknown to most providers."""

    endpoint: str | None = None  # exact URL requests are POSTed to (remote providers)
    top_k: int | None = None  # how many labels to ask for / keep
    device: str = "auto"  # local providers: auto|cpu|cuda
    batch_size: int = 32  # local providers: images per forward pass
    timeout: float = 30.0  # remote providers: seconds per request
    extra: dict = field(default_factory=dict)


class Teacher:
    """Base class. Subclasses set the class attributes and implement :meth:`classify`."""

    spec: str = ""
    score_kind: str = DISTRIBUTION
    key_env_var: str | None = None  # the environment variable holding the API key, if any
    remote: bool = False  # True: calls cost money and go through the rate limiter/retries
    max_batch: int = 1  # images per request (google: 16; local: the forward batch size)

    def classify(self, images: list[bytes]) -> list[Answer]:
        """Answer each image; never raises for a bad image, returns a failed Answer instead."""
        raise NotImplementedError

    def close(self) -> None:
        """Release sockets/models; optional."""


TeacherFactory = Callable[[str, TeacherOptions], Teacher]
_REGISTRY: dict[str, TeacherFactory] = {}


def register(prefix: str) -> Callable[[TeacherFactory], TeacherFactory]:
    """Register a provider factory for specs ``prefix`` and ``prefix:NAME``."""

    def wrap(factory: TeacherFactory) -> TeacherFactory:
        _REGISTRY[prefix] = factory
        return factory

    return wrap


def split_spec(spec: str) -> tuple[str, str]:
    """``"hf:owner/model"`` -> ``("hf", "owner/model")``; ``"local"`` -> ``("local", "")``."""
    prefix, _, name = spec.strip().partition(":")
    return prefix, name


def create_teacher(spec: str, options: TeacherOptions | None = None) -> Teacher:
    """Build the teacher for ``spec``; an unknown prefix fails at once listing the valid ones."""
    _load_builtins()
    prefix, name = split_spec(spec)
    if prefix not in _REGISTRY:
        raise DistillError(
            f"unknown teacher {spec!r}; valid prefixes: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[prefix](name, options or TeacherOptions())


def get_key(env_var: str) -> str:
    """The API key from the environment; keys are never taken from flags or files."""
    value = os.environ.get(env_var, "").strip()
    if not value:
        raise DistillError(f"no API key: set the environment variable {env_var}")
    return value


def _load_builtins() -> None:
    # Importing the modules runs their @register decorators, as a plugin's import would.
    from . import local, remote  # noqa: F401


def key_env_vars() -> set[str]:
    """The environment variables holding API keys, of every provider class defined so far (the
    built-in remote ones are imported here; a plugin's once it is imported): what output redacts."""
    from . import remote  # noqa: F401  (not local: no key, and it would import torch)

    names, todo = set(), [Teacher]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.key_env_var:
            names.add(cls.key_env_var)
    return names


class TransientError(Exception):
    """A call that may succeed if retried (429, 5xx, timeout, dropped connection, garbage body).

    ``retry_after`` (seconds) is what the server asked for (Retry-After, estimated_time).
    ``status`` is the HTTP status, when there was one.
    """

    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class AuthError(DistillError):
    """401/403: the key is missing or wrong. Stops the whole run at once."""
