"""Pacing (a shared rate limit) and recovery (retries) for calls to a paid teacher: two pieces."""

from __future__ import annotations

import logging
import threading
import time

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from ..teachers.base import TransientError

log = logging.getLogger("distill.harvest")


class RateLimiter:
    """Hands out request slots ``1/rate`` seconds apart to any number of threads.

    Hand-written rather than a library: it is a dozen lines, and slot scheduling (rather than
    a bucket that refills and allows bursts) keeps a server with a strict per-second limit from
    ever seeing more than ``rate`` requests in a second, while wasting no time below it.
    """

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


def retry_policy(max_attempts: int = 6, max_wait: float = 60.0, wait_scale: float = 1.0) -> Retrying:
    """Retry transient failures only, with exponential backoff and jitter, honouring the
    server's Retry-After / estimated_time. ``wait_scale=0`` makes tests not sleep."""
    backoff = wait_exponential_jitter(multiplier=0.5, max=max_wait, jitter=0.5)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = getattr(exc, "retry_after", None)
        seconds = min(max(asked, 0.0), max_wait) if asked is not None else backoff(state)
        return seconds * wait_scale

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception()
        log.info("retrying after %s (attempt %d, waiting %.1fs)", exc, state.attempt_number,
                 state.next_action.sleep if state.next_action else 0.0)

    return Retrying(
        stop=stop_after_attempt(max_attempts),
        wait=wait,
        retry=retry_if_exception_type(TransientError),
        before_sleep=before_sleep,
        reraise=True,
    )
