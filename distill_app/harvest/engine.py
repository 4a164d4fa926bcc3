"""The harvest engine: every image sent once to the teacher, every answer stored as it arrives.

Order of work: scan and hash the images (``images`` table), drop the pairs already answered,
then claim small batches in the store (so that two harvesters never pay twice), send them
through the rate limiter and the retry policy on ``concurrency`` threads, and record each
batch's answers in its own transaction from the main thread (SQLite has one writer).

A "call" is one image sent to the teacher (the unit APIs bill and count quotas in); a
"request" is one HTTP request (Google's carries up to 16 images).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import datetime as dt
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from cache import ImageRow, Response, Store, open_store

from ..data import images as imgs
from ..errors import DistillError
from .pacing import RateLimiter, retry_policy
from .select import STRATEGIES, select
from ..teachers import Teacher, TeacherOptions, TransientError, create_teacher
from .upload import prepare_upload

log = logging.getLogger("distill.harvest")


@dataclass
class HarvestConfig:
    images: str
    teacher: str = "local"
    endpoint: str | None = None
    db: str | None = None
    rate: float | None = None  # requests per second, shared by all threads
    concurrency: int = 4  # requests in flight
    max_calls: int | None = None  # images sent in this run
    daily_quota: int | None = None  # images sent per UTC day to this teacher, across runs
    top_k: int | None = None
    upload_size: int = 512
    cost_per_1k: float = 0.0  # USD per 1,000 calls
    dry_run: bool = False
    device: str = "auto"
    batch_size: int = 32  # local teachers: images per forward pass
    timeout: float = 30.0
    max_attempts: int = 6
    wait_scale: float = 1.0  # multiplies every retry wait; tests set 0
    lease_s: float = 600.0  # a claim older than this belongs to a dead harvester
    select: str = "random"  # which waiting images a budget smaller than the wait goes to (select.py)
    seed: int = 0  # of the selection order: the same seed is the same order, run after run


def check_config(cfg: HarvestConfig) -> None:
    """DistillError, echoing the value, for a flag out of range: before any file is scanned."""
    checks = [
        (cfg.rate is None or cfg.rate > 0, f"--rate must be a positive number of requests per second, got {cfg.rate}"),
        (cfg.concurrency >= 1, f"--concurrency must be at least 1, got {cfg.concurrency}"),
        (cfg.max_calls is None or cfg.max_calls >= 0, f"--max-calls must be >= 0, got {cfg.max_calls}"),
        (cfg.daily_quota is None or cfg.daily_quota >= 0, f"--daily-quota must be >= 0, got {cfg.daily_quota}"),
        (cfg.top_k is None or cfg.top_k >= 1, f"--top-k must be at least 1, got {cfg.top_k}"),
        (cfg.upload_size >= 16, f"--upload-size must be at least 16 pixels, got {cfg.upload_size}"),
        (cfg.cost_per_1k >= 0, f"--cost-per-1k must be >= 0, got {cfg.cost_per_1k}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.max_attempts >= 1, f"retry attempts must be at least 1, got {cfg.max_attempts}"),
        (cfg.select in STRATEGIES, f"--select must be one of {', '.join(STRATEGIES)}, got {cfg.select!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DistillError(message)


@dataclass
class Summary:
    teacher: str
    db: str
    files_found: int = 0
    images: int = 0  # distinct contents
    already_cached: int = 0
    to_send: int = 0
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_reason: dict = field(default_factory=dict)
    skipped_files: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    busy_elsewhere: int = 0  # claimed by another live harvester
    calls: int = 0  # images sent in this run, retries included
    requests: int = 0
    calls_today: int = 0
    estimated_cost_usd: float = 0.0
    elapsed_s: float = 0.0
    requests_per_s: float = 0.0
    stopped: str | None = None  # why the run stopped before the end (budget), with when to resume
    dry_run: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class BudgetReached(Exception):
    pass


class Budget:
    """Calls left in this run: the smaller of --max-calls and what --daily-quota leaves today.

    A batch reserves its first attempt's calls when it is claimed, so the last batch is cut to
    what is left and the budget is spent exactly; a retry takes more calls from what is left (or
    leaves its images unsent), and a batch that never goes out gives its reservation back.
    """

    def __init__(self, max_calls: int | None, daily_quota: int | None, used_today: int):
        limits = [x for x in (max_calls, None if daily_quota is None else daily_quota - used_today)
                  if x is not None]
        self.left = max(0, min(limits)) if limits else None
        self.reason = None
        if limits:
            daily_left = None if daily_quota is None else daily_quota - used_today
            self.reason = "daily quota" if daily_left is not None and daily_left == min(limits) else "max calls"
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        """No more calls in this run (the key was rejected): requests not yet sent stay unsent."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def reserve(self, n: int) -> int:
        """Set aside the first attempt of a new batch of up to ``n`` images; returns how many it may
        hold (0: no room now). One step under the lock: retries on other threads take calls too."""
        with self._lock:
            if self._closed:
                return 0
            k = n if self.left is None else max(0, min(n, self.left))
            if self.left is not None:
                self.left -= k
            return k

    def give_back(self, n: int) -> None:
        with self._lock:
            if self.left is not None:
                self.left += n

    def take(self, n: int) -> bool:
        """Calls for a retry, from what is not reserved."""
        with self._lock:
            if self._closed:
                return False
            if self.left is None:
                return True
            if self.left < n:
                return False
            self.left -= n
            return True


@dataclass
class BatchResult:
    responses: list[Response]
    calls: int = 0
    requests: int = 0
    reserved_used: int = 0  # calls of the first attempt, made on the batch's reservation
    unsent: list[str] = field(default_factory=list)
    auth_error: str | None = None


def harvest(cfg: HarvestConfig, progress: Callable[[int, int], None] | None = None) -> dict:
    """Run one harvest; returns the summary as a dict. ``progress(done, total)`` is optional."""
    start = time.monotonic()
    check_config(cfg)
    options = TeacherOptions(endpoint=cfg.endpoint, top_k=cfg.top_k, device=cfg.device,
                             batch_size=cfg.batch_size, timeout=cfg.timeout)
    store = open_store(cfg.db)
    teacher = _make_teacher(cfg, options)
    summary = Summary(teacher=teacher.spec, db=store.path, dry_run=cfg.dry_run)
    try:
        teacher_id = store.teacher_id(teacher.spec, teacher.score_kind, {"top_k": cfg.top_k})
        paths = ingest(store, cfg.images, summary)
        answered = store.answered(teacher_id, paths)
        todo = select(cfg.select, [sha for sha in paths if sha not in answered], store.image_labels(paths), cfg.seed)
        summary.already_cached, summary.to_send = len(paths) - len(todo), len(todo)
        if cfg.dry_run:
            summary.estimated_cost_usd = round(len(todo) * cfg.cost_per_1k / 1000, 6)
        elif todo:
            _Run(store, teacher, teacher_id, cfg, paths, summary).send(todo, progress)
        summary.calls_today = store.calls_on(teacher_id)
    finally:
        teacher.close()
        store.close()
    summary.elapsed_s = round(time.monotonic() - start, 3)
    return summary.to_dict()


def _make_teacher(cfg: HarvestConfig, options: TeacherOptions) -> Teacher:
    teacher = create_teacher(cfg.teacher, options)
    if not teacher.remote:
        teacher.max_batch = max(1, cfg.batch_size)
    return teacher


def ingest(store: Store, images_dir: str, summary: Summary) -> dict[str, str]:
    """Scan, hash and record the images; returns sha256 -> one path holding those bytes."""
    found = imgs.scan_images(images_dir)
    summary.files_found = found.files
    rows = [ImageRow(i.sha256, imgs.display_path(i.path), i.width, i.height, i.bytes,
                     i.label and imgs.display_path(i.label)) for i in found.images]
    for start in range(0, len(rows), 500):
        store.add_images(rows[start:start + 500])
    paths = {i.sha256: i.path for i in found.distinct()}
    summary.images = len(paths)
    summary.skipped_files = sum(found.skipped.values())
    summary.skipped_by_reason = dict(found.skipped.most_common())
    if not found.files:
        raise DistillError(f"no images (jpg/jpeg/png/webp/bmp/gif) under {images_dir}")
    return paths


class _Run:
    """The sending phase of one harvest: claims, threads, and the store writes of the answers."""

    def __init__(self, store: Store, teacher: Teacher, teacher_id: int, cfg: HarvestConfig,
                 paths: dict[str, str], summary: Summary):
        self.store, self.teacher, self.teacher_id, self.cfg = store, teacher, teacher_id, cfg
        self.paths, self.summary = paths, summary
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.limiter = RateLimiter(cfg.rate if teacher.remote else None)
        self.workers = max(1, cfg.concurrency) if teacher.remote else 1
        self.failed: collections.Counter = collections.Counter()
        self.budget = Budget(cfg.max_calls, cfg.daily_quota, store.calls_on(teacher_id))

    def send(self, todo: list[str], progress: Callable[[int, int], None] | None) -> None:
        _release_dead_claims(self.store, self.teacher_id)
        queue = collections.deque(todo)
        started = time.monotonic()
        try:
            with cf.ThreadPoolExecutor(self.workers, thread_name_prefix="harvest") as pool:
                running: dict[cf.Future, list[str]] = {}
                try:
                    self._pump(pool, queue, running, progress)
                finally:
                    for fut, batch in running.items():
                        if fut.cancel():  # never started: its calls were counted, not made
                            self._add_usage(-len(batch))
                            self.budget.give_back(len(batch))
        finally:
            # Claims never answered (cancelled, over budget, stopped by a bad key) go back at
            # once, so a rerun need not wait for their lease to run out.
            self.store.release_owner(self.teacher_id, self.owner)
        s = self.summary
        s.failed_by_reason = dict(self.failed.most_common())
        elapsed = time.monotonic() - started
        s.requests_per_s = round(s.requests / elapsed, 3) if elapsed > 0 else 0.0
        s.estimated_cost_usd = round(s.calls * self.cfg.cost_per_1k / 1000, 6)

    def _pump(self, pool, queue, running, progress) -> None:
        """Keep up to 2 x workers batches in flight; store each batch's answers as it completes.
        Images a batch could not send (a retry found the budget spent) go back to the front of
        the queue, for a later batch cut to what is left; the run stops when nothing is in flight
        and the budget has no room."""
        while True:
            while queue and len(running) < self.workers * 2 and not self.summary.stopped:
                batch = self._claim_next(queue)
                if batch is None:  # no room now; batches in flight may give calls back
                    break
                if batch:
                    fut = pool.submit(_call_batch, self.teacher, batch, self.paths, self.cfg,
                                      self.limiter, self.budget)
                    running[fut] = batch
            if not running:
                if queue and not self.summary.stopped and not self.budget.closed:
                    self.summary.stopped = _budget_message(self.budget)
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            fatal = None
            for fut in done:
                batch = running.pop(fut)
                result = fut.result()
                try:
                    self._store(result, counted=len(batch))
                except DistillError as e:  # the whole run stops; what others paid for is stored first
                    fatal = fatal or e
                if result.unsent and not self.budget.closed:
                    queue.extendleft(reversed(result.unsent))
                if progress:
                    progress(self.summary.succeeded + self.summary.failed, self.summary.to_send)
            if fatal:
                for fut in cf.as_completed(list(running)):  # the budget is closed: they finish fast
                    try:
                        self._store(fut.result(), counted=len(running.pop(fut)))
                    except DistillError:
                        pass
                raise fatal

    def _claim_next(self, queue) -> list[str] | None:
        """Claim up to a batch of images from the queue, no more than the budget has room for
        (reserved for them); others' live claims are skipped. None: the budget has no room now."""
        room = self.budget.reserve(min(self.teacher.max_batch, len(queue)))
        if not room:
            return None
        wanted = [queue.popleft() for _ in range(room)]
        claimed = self.store.claim(self.teacher_id, wanted, self.owner, self.cfg.lease_s)
        self.summary.busy_elsewhere += len(wanted) - len(claimed)
        self.budget.give_back(room - len(claimed))
        if claimed:
            # Counted before sending, corrected when the answers come back (_store): a harvester
            # killed with calls in flight has already counted them against the daily quota.
            self._add_usage(len(claimed))
        return claimed

    def _add_usage(self, calls: int) -> None:
        self.store.add_usage(self.teacher_id, calls, calls * self.cfg.cost_per_1k / 1000)

    def _store(self, result: BatchResult, counted: int) -> None:
        """Store a batch's answers; ``counted`` calls were added to the usage when it was claimed."""
        store, s = self.store, self.summary
        self.budget.give_back(counted - result.reserved_used)  # images never sent on the reservation
        if result.responses:
            store.record(self.teacher_id, result.responses)
        if result.calls != counted:  # retries add calls; a batch never sent takes its count back
            self._add_usage(result.calls - counted)
        if result.unsent:
            store.release(self.teacher_id, result.unsent, self.owner)
        s.calls += result.calls
        s.requests += result.requests
        s.sent += len({r.image for r in result.responses if r.attempts})
        for r in result.responses:
            if r.scores is not None:
                s.succeeded += 1
            else:
                s.failed += 1
                self.failed[r.error] += 1
        if result.auth_error:
            raise DistillError(result.auth_error)


def _release_dead_claims(store: Store, teacher_id: int) -> None:
    """Give back the claims of harvesters on this machine whose process is gone (killed,
    crashed): their lease would otherwise keep those images from a rerun for lease_s."""
    for owner in store.claim_owners(teacher_id):
        if _owner_is_dead(owner):
            store.release_owner(teacher_id, owner)


def _owner_is_dead(owner: str) -> bool:
    """True only when sure: ``owner`` ("host:pid:nonce") is on this host and its pid is gone.
    Another host's claims, or a pid reused since, wait for the lease instead."""
    host, pid, _ = (owner.rsplit(":", 2) + ["", ""])[:3]
    if host != os.uname().nodename or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False


def _call_batch(teacher, batch, paths, cfg, limiter, budget) -> BatchResult:
    """One request (with its retries) for ``batch``; runs on a worker thread, touches no store."""
    result = BatchResult(responses=[])
    uploads, ready = [], []
    for sha in batch:
        try:
            with open(paths[sha], "rb") as f:
                data = f.read()
            uploads.append(prepare_upload(data, cfg.upload_size)[0] if teacher.remote else data)
            ready.append(sha)
        except Exception as e:  # the file changed or vanished since the scan
            result.responses.append(Response(sha, None, error=f"cannot read image: {type(e).__name__}",
                                             attempts=0))
    if not ready:
        return result
    t0 = time.monotonic()
    try:
        answers = _with_retries(teacher, uploads, cfg, limiter, budget, result)
    except BudgetReached:
        result.unsent = ready
        return result
    except DistillError as e:  # AuthError (a rejected key), a redirect, an untrusted certificate, ...
        budget.close()  # the other threads must not send more requests; theirs are stored first
        result.auth_error = str(e)
        result.unsent = ready
        return result
    except TransientError as e:
        reason = f"{e.reason} (gave up after {result.requests} attempts)"
        result.responses += [Response(sha, None, http_status=e.status, error=reason,
                                      attempts=result.requests) for sha in ready]
        return result
    latency = (time.monotonic() - t0) * 1000 / len(ready)
    for sha, a in zip(ready, answers):
        result.responses.append(Response(sha, a.scores, raw=a.raw, http_status=a.http_status,
                                         error=a.error, latency_ms=a.latency_ms or latency,
                                         attempts=result.requests))
    return result


def _with_retries(teacher, uploads, cfg, limiter, budget, result: BatchResult):
    policy = retry_policy(cfg.max_attempts, wait_scale=cfg.wait_scale)
    for attempt in policy:
        with attempt:
            if result.requests == 0 and not budget.closed:  # the first attempt: reserved at claim time
                result.reserved_used = len(uploads)
            elif not budget.take(len(uploads)):
                raise BudgetReached()
            limiter.acquire()
            result.calls += len(uploads)
            result.requests += 1
            answers = teacher.classify(uploads)
            if len(answers) != len(uploads):
                raise TransientError(f"teacher answered {len(answers)} of {len(uploads)} images")
    return answers


def _budget_message(budget: Budget) -> str:
    if budget.reason == "daily quota":
        now = dt.datetime.now(dt.timezone.utc)
        reset = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        hours = (reset - now).total_seconds() / 3600
        return f"daily quota reached; run again after 00:00 UTC (in {hours:.1f} h) to go on"
    return "--max-calls reached; run again (with a higher --max-calls) to go on"
