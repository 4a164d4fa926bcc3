"""Pacing (a shared, adaptive rate limit) and the retry rule for calls to a paid teacher.

Retries do not sleep in a worker thread: a failed call goes back to the engine's queue with a
not-before time from :class:`RetryPolicy`, and the worker takes the next ready call. What one
call learns about the server is shared through :class:`RateLimiter`: a 429 slows everyone
(the server said the rate is too high), and a phase where every call in flight gets a 503
pauses everyone until the server's ``estimated_time``.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from types import SimpleNamespace

from tenacity.wait import wait_exponential_jitter

from ..teachers.base import TransientError

log = logging.getLogger("distill.harvest")

AUTO = "auto"  # --rate auto: find the rate the server allows


class RateLimiter:
    """Hands out request slots ``1/rate`` seconds apart to any number of threads, and adapts.

    Hand-written rather than a library: slot scheduling (rather than a bucket that refills and
    allows bursts) keeps a server with a strict per-second limit from ever seeing more than
    ``rate`` requests in a second, and none of the rate-limit packages adapts its rate.

    Adaptation is TCP's AIMD. ``rate=None`` and not auto: no pacing at all. A given rate is a
    ceiling: a 429 cuts the rate to ``DECREASE`` x what the server let through in the last
    second (at most one cut per second: the other calls in flight at an overshoot come back 429
    too), and each answered request then adds back ``INCREASE`` of the rate per second, up to
    the ceiling, while calls wait for their slots. ``--rate auto`` starts at ``AUTO_START`` and
    doubles every second until the first 429 (slow start), then does the same up to
    ``AUTO_MAX``.
    """

    AUTO_START = 2.0
    AUTO_MAX = 1000.0
    MIN_RATE = 0.1
    DECREASE = 0.85  # x what the server let through: one client, a gentler cut than TCP's 0.5
    NEAR, GENTLE = 0.9, 0.97  # let through >= NEAR x the rate: at the limit, cut to GENTLE x
    INCREASE = 0.05  # of the rate, per second without a 429 (at least 0.5 requests/s per second)

    def __init__(self, rate: float | str | None, senders: int = 1):
        self.senders = senders  # threads sending: a 503 for each of them in a row is a phase
        self.auto = rate == AUTO
        self.ceiling = self.AUTO_MAX if self.auto else rate
        self.rate: float | None = self.AUTO_START if self.auto else rate
        self.throttles = 0  # 429s seen
        self.paused_s = 0.0  # time every call waited out an all-503 phase
        self._slow_start = self.auto
        self._next = 0.0
        self._paused_until = 0.0
        self._changed = time.monotonic()
        self._cut = -math.inf
        self._waited = -math.inf  # when a caller last waited for its slot: the rate was binding
        self._admitted: collections.deque[float] = collections.deque()  # times, the last second
        self._unavailable = 0  # 503s in a row, nothing else between them
        self._lock = threading.Lock()

    def acquire(self) -> None:
        """Wait for this thread's slot, and for the end of a pause first."""
        while True:
            with self._lock:
                now = time.monotonic()
                if self._paused_until <= now:
                    slot = max(now, self._next)
                    if self.rate:
                        self._next = slot + 1.0 / self.rate
                        if slot > now:
                            self._waited = now
                    break
                wait = self._paused_until - now
            time.sleep(wait)
        if slot > now:
            time.sleep(slot - now)

    def admitted(self) -> None:
        """A request the server took (answered, or failed other than by 429): the rate may grow."""
        with self._lock:
            now = time.monotonic()
            self._admitted.append(now)
            while self._admitted and self._admitted[0] < now - 1.0:
                self._admitted.popleft()
            elapsed, self._changed = now - self._changed, now
            # Grow only a rate that holds calls back: one the threads cannot fill (the server's
            # latency bounds them) would grow without limit and say nothing (RFC 7661's rule).
            if self.rate is None or now - self._waited > 1.0:
                return
            if self._slow_start:
                self.rate *= 2.0 ** elapsed
            else:
                self.rate += max(0.5, self.INCREASE * self.rate) * elapsed
            self.rate = min(self.rate, self.ceiling)

    def throttled(self) -> None:
        """A 429: the rate is too high for the server."""
        with self._lock:
            self.throttles += 1
            now = time.monotonic()
            if self.rate is None or now - self._cut < 1.0:
                return
            let_through = sum(1 for t in self._admitted if t >= now - 1.0)
            if let_through >= self.NEAR * self.rate:
                # The server took nearly all we sent: we are at its limit, and the 429 is a call
                # that arrived a little early (jitter). A small cut, not a sawtooth at the limit.
                new = self.GENTLE * self.rate
            else:
                # It let through less than we sent: that is its limit. Floored at a quarter of the
                # rate: a second of timeouts says little (a deeper overshoot: one more cut a second).
                new = self.DECREASE * max(let_through, self.rate / 4)
            new = max(self.MIN_RATE, new)
            log.info("HTTP 429: pacing %.1f -> %.1f requests/s", self.rate, new)
            self.rate, self._slow_start, self._cut, self._changed = new, False, now, now

    def other_response(self) -> None:
        """Anything but a 503 ends a run of them."""
        with self._lock:
            self._unavailable = 0

    def unavailable(self, seconds: float) -> None:
        """A 503 that asks for ``seconds``. One among answers is that call's retry only; one for
        every sender in a row (no answer between) is the server loading or down for everyone:
        nobody sends for ``seconds``, instead of each sender spending its calls into it."""
        with self._lock:
            self._unavailable += 1
            if self._unavailable < self.senders:
                return
            self._unavailable = 0
            now = time.monotonic()
            until = now + seconds
            if until > self._paused_until:
                log.info("HTTP 503 for every call in flight: pausing all sending for %.1fs", seconds)
                self.paused_s += until - max(self._paused_until, now)
                self._paused_until = until


class RetryPolicy:
    """Which failed calls go again, and when: transient failures only, bounded attempts,
    tenacity's exponential backoff with jitter, or what the server asked for (Retry-After,
    ``estimated_time``). ``wait_scale=0`` makes tests not wait."""

    def __init__(self, max_attempts: int = 6, max_wait: float = 60.0, wait_scale: float = 1.0):
        self.max_attempts, self.max_wait, self.wait_scale = max_attempts, max_wait, wait_scale
        self._backoff = wait_exponential_jitter(multiplier=0.5, max=max_wait, jitter=0.5)

    def gives_up(self, attempts: int) -> bool:
        return attempts >= self.max_attempts

    def wait(self, error: TransientError, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``."""
        asked = error.retry_after
        if asked is not None:
            seconds = min(max(asked, 0.0), self.max_wait)
        else:  # tenacity's wait strategies read only the attempt number of the call state
            seconds = self._backoff(SimpleNamespace(attempt_number=attempts))
        return seconds * self.wait_scale


def retry_policy(max_attempts: int = 6, max_wait: float = 60.0, wait_scale: float = 1.0) -> RetryPolicy:
    return RetryPolicy(max_attempts, max_wait, wait_scale)
