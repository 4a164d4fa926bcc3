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
import heapq
import itertools
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
from .pacing import AUTO, RateLimiter, retry_policy
from .select import MODEL_STRATEGIES, NEEDS_SELECTOR, STRATEGIES, Pool, select
from ..teachers import Teacher, TeacherOptions, TransientError, create_teacher
from .upload import prepare_upload

log = logging.getLogger("distill.harvest")


@dataclass
class HarvestConfig:
    images: str
    teacher: str = "local"
    endpoint: str | None = None
    db: str | None = None
    rate: float | str | None = None  # requests per second, shared by all threads; "auto": find it
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
    selector: str | None = None  # a student run folder or model.pt: the model of --select uncertainty|hybrid


def check_config(cfg: HarvestConfig) -> None:
    """DistillError, echoing the value, for a flag out of range: before any file is scanned."""
    checks = [
        (cfg.rate in (None, AUTO) or (isinstance(cfg.rate, (int, float)) and cfg.rate > 0),
         f"--rate must be a positive number of requests per second or 'auto', got {cfg.rate}"),
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
    if cfg.select in NEEDS_SELECTOR and not cfg.selector:
        raise DistillError(f"--select {cfg.select} needs --selector RUN: the run folder (or model.pt) of a "
                           f"student from `distill train`, whose uncertainty picks the images")
    if cfg.selector and cfg.select not in MODEL_STRATEGIES:
        raise DistillError(f"--selector is used by --select {', '.join(MODEL_STRATEGIES)} only, "
                           f"not {cfg.select}")
    if cfg.selector and not os.path.exists(cfg.selector):
        raise DistillError(f"--selector {imgs.display_path(cfg.selector)!r}: no such run folder or model file")


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
    images_per_s: float = 0.0  # answered images per second of sending (a local teacher's speed)
    load_s: float | None = None  # a local teacher: loading the model, apart from answering
    throttled: int = 0  # 429s received
    paused_s: float = 0.0  # sending paused for everyone: every call in flight got a 503
    final_rate: float | None = None  # the pacer's requests/s at the end (--rate auto: what it found)
    stopped: str | None = None  # why the run stopped before the end (budget), with when to resume
    selection: dict = field(default_factory=dict)  # strategy, round; a model strategy's scoring (select.Pool)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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
        todo = _order(cfg, store, teacher_id, paths, answered, summary)
        summary.already_cached, summary.to_send = len(paths) - len(todo), len(todo)
        if cfg.dry_run:
            summary.estimated_cost_usd = round(len(todo) * cfg.cost_per_1k / 1000, 6)
        elif todo:
            if hasattr(teacher, "load"):  # a local model: its loading is not answering time
                t0 = time.monotonic()
                teacher.load()
                summary.load_s = round(time.monotonic() - t0, 3)
            _Run(store, teacher, teacher_id, cfg, paths, summary).send(todo, progress)
        summary.calls_today = store.calls_on(teacher_id)
    finally:
        teacher.close()
        store.close()
    summary.elapsed_s = round(time.monotonic() - start, 3)
    return summary.to_dict()


def _order(cfg: HarvestConfig, store: Store, teacher_id: int, paths: dict[str, str], answered: set[str],
           summary: Summary) -> list[str]:
    """The waiting images in the order of ``--select``. The model strategies get the budget as it
    stands now (the sending phase reads it again: another harvester may spend some meanwhile);
    a dry run buys nothing, so it gets no budget and runs no model (select.py)."""
    waiting = [sha for sha in paths if sha not in answered]
    budget = 0 if cfg.dry_run else Budget(cfg.max_calls, cfg.daily_quota, store.calls_on(teacher_id)).left
    pool = Pool(paths, budget, sorted(answered), cfg.selector, cfg.device, cfg.batch_size)
    order = select(cfg.select, waiting, store.image_labels(paths), cfg.seed, pool)
    summary.selection = {"strategy": cfg.select, "seed": cfg.seed, "selector": cfg.selector, **pool.report}
    return order


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
    """The sending phase of one harvest: claims, threads, retries, and the store writes.

    Worker threads make one attempt each and return. A failed attempt goes back to the main
    thread, which schedules the retry at a not-before time and meanwhile keeps the workers on
    other calls: a retry never holds a slot while it waits (see pacing.py for the shared
    signals: 429s slow the pacer, an all-503 phase pauses everyone).
    """

    def __init__(self, store: Store, teacher: Teacher, teacher_id: int, cfg: HarvestConfig,
                 paths: dict[str, str], summary: Summary):
        self.store, self.teacher, self.teacher_id, self.cfg = store, teacher, teacher_id, cfg
        self.paths, self.summary = paths, summary
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.workers = max(1, cfg.concurrency) if teacher.remote else 1
        self.limiter = RateLimiter(cfg.rate if teacher.remote else None, senders=self.workers)
        self.policy = retry_policy(cfg.max_attempts, wait_scale=cfg.wait_scale)
        self.failed: collections.Counter = collections.Counter()
        self.budget = Budget(cfg.max_calls, cfg.daily_quota, store.calls_on(teacher_id))
        self.waiting: list[tuple[float, int, _Job]] = []  # retries, a heap by not-before time
        self.running: dict[cf.Future, _Job] = {}
        self._jobs = itertools.count()
        self.rank: dict[str, int] = {}  # sha256 -> place in this run's order, from 1
        self.round = 0  # of the selections this run records (store.selections)

    def send(self, todo: list[str], progress: Callable[[int, int], None] | None) -> None:
        _release_dead_claims(self.store, self.teacher_id)
        queue = collections.deque(todo)
        self.rank = {sha: i for i, sha in enumerate(todo, 1)}
        # Harvesters of one teacher running at once share a round: one round, one budget's choice.
        self.round = self.store.last_selection_round(self.teacher_id) + 1
        self.summary.selection["round"] = self.round
        started = time.monotonic()
        try:
            with cf.ThreadPoolExecutor(self.workers, thread_name_prefix="harvest") as pool:
                try:
                    self._pump(pool, queue, progress)
                finally:
                    # Jobs that will not be stored: a cancelled one never started its attempt.
                    idle = [job for fut, job in self.running.items() if fut.cancel()]
                    for job in idle + [job for _, _, job in self.waiting]:
                        self._add_usage(job.result.calls - len(job.batch))  # counted at claim
        finally:
            # Claims never answered (cancelled, over budget, stopped by a bad key) go back at
            # once, so a rerun need not wait for their lease to run out.
            self.store.release_owner(self.teacher_id, self.owner)
        s = self.summary
        s.failed_by_reason = dict(self.failed.most_common())
        elapsed = time.monotonic() - started
        s.requests_per_s = round(s.requests / elapsed, 3) if elapsed > 0 else 0.0
        s.images_per_s = round(s.succeeded / elapsed, 3) if elapsed > 0 else 0.0
        s.estimated_cost_usd = round(s.calls * self.cfg.cost_per_1k / 1000, 6)
        s.throttled = self.limiter.throttles
        s.paused_s = round(self.limiter.paused_s, 3)
        s.final_rate = round(self.limiter.rate, 2) if self.limiter.rate else None

    def _pump(self, pool, queue, progress) -> None:
        """Keep up to 2 x workers attempts in flight, due retries first; store each batch's
        answers as it settles. Images a batch could not send (a retry found the budget spent) go
        back to the front of the queue, for a later batch cut to what is left; the run stops when
        nothing is in flight or waiting and the budget has no room."""
        fatal = None
        while True:
            now = time.monotonic()
            while self.waiting and self.waiting[0][0] <= now and len(self.running) < self.workers * 2:
                job = heapq.heappop(self.waiting)[2]
                if fatal is None and self.budget.take(len(job.ready)):
                    self._submit(pool, job)
                else:
                    job.result.unsent = job.ready
                    fatal = self._settle(job, queue, progress) or fatal
            while queue and len(self.running) < self.workers * 2 and fatal is None \
                    and not self.summary.stopped:
                batch = self._claim_next(queue)
                if batch is None:  # no room now; batches in flight may give calls back
                    break
                if batch:
                    self._submit(pool, _Job(batch, BatchResult(responses=[])))
            if not self.running:
                if self.waiting:
                    time.sleep(max(0.0, self.waiting[0][0] - now))
                    continue
                if queue and not self.summary.stopped and not self.budget.closed and fatal is None:
                    self.summary.stopped = _budget_message(self.budget)
                break
            timeout = max(0.0, self.waiting[0][0] - now) if self.waiting else None
            done, _ = cf.wait(self.running, timeout=timeout, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = self.running.pop(fut)
                if self._outcome(job, fut):
                    fatal = self._settle(job, queue, progress) or fatal
            if fatal:  # what is waiting will not be sent: the budget is closed
                for _, _, job in self.waiting:
                    job.result.unsent = job.ready
                    self._settle(job, queue, progress)
                self.waiting.clear()
        if fatal:
            raise fatal

    def _submit(self, pool, job: _Job) -> None:
        fut = pool.submit(_attempt, self, job)
        self.running[fut] = job

    def _outcome(self, job: _Job, fut: cf.Future) -> bool:
        """Read one attempt's outcome into ``job``; False when the job waits for a retry."""
        result = job.result
        try:
            answers = fut.result()
        except _NotSent:
            result.unsent = job.ready
        except DistillError as e:  # AuthError (a rejected key), a redirect, an untrusted certificate, ...
            self.budget.close()  # (closed already by the worker) what others paid for is stored first
            result.auth_error = str(e)
            result.unsent = job.ready
        except TransientError as e:
            if not self.policy.gives_up(result.requests):
                wait = self.policy.wait(e, result.requests)
                log.info("retrying after %s (attempt %d, in %.1fs)", e, result.requests, wait)
                heapq.heappush(self.waiting, (time.monotonic() + wait, next(self._jobs), job))
                return False
            reason = f"{e.reason} (gave up after {result.requests} attempts)"
            result.responses += [Response(sha, None, http_status=e.status, error=reason,
                                          attempts=result.requests) for sha in job.ready]
        else:
            latency = job.elapsed * 1000 / max(1, len(job.ready))
            for sha, a in zip(job.ready, answers):
                result.responses.append(Response(sha, a.scores, raw=a.raw, http_status=a.http_status,
                                                 error=a.error, latency_ms=a.latency_ms or latency,
                                                 attempts=result.requests))
        return True

    def _settle(self, job: _Job, queue, progress) -> DistillError | None:
        """Store a finished job; the DistillError that stops the run, if it brought one."""
        fatal = None
        try:
            self._store(job.result, counted=len(job.batch))
        except DistillError as e:  # the whole run stops; what others paid for is stored first
            fatal = e
        if job.result.unsent and not self.budget.closed:
            queue.extendleft(reversed(job.result.unsent))
        if progress:
            progress(self.summary.succeeded + self.summary.failed, self.summary.to_send)
        return fatal

    def _claim_next(self, queue) -> list[str] | None:
        """Claim up to a batch of images from the queue, no more than the budget has room for
        (reserved for them); others' live claims are skipped. None: the budget has no room now."""
        room = self.budget.reserve(min(self.teacher.max_batch, len(queue)))
        if not room:
            return None
        wanted = [queue.popleft() for _ in range(room)]
        # What was chosen and why, recorded as it is claimed: images others held are not this run's.
        cfg = self.cfg
        selection = {"round": self.round, "ranks": self.rank, "strategy": cfg.select,
                     "selector": cfg.selector and os.path.abspath(cfg.selector), "seed": cfg.seed}
        claimed = self.store.claim(self.teacher_id, wanted, self.owner, cfg.lease_s, selection)
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


class _NotSent(Exception):
    """The budget closed (a rejected key elsewhere) before this attempt went out."""


@dataclass
class _Job:
    """A claimed batch on its way: its readable images, their uploads, what its attempts cost."""

    batch: list[str]
    result: BatchResult
    ready: list[str] = field(default_factory=list)
    uploads: list[bytes] | None = None  # prepared by the first attempt, on a worker thread
    elapsed: float = 0.0  # seconds of the last attempt


def _attempt(run: _Run, job: _Job) -> list:
    """One request for ``job``; runs on a worker thread, touches no store. Raises what the
    teacher raised, after telling the pacer what it says about the server; the main thread
    decides about retries (a retry's calls are taken from the budget there, the first attempt's
    were reserved when the batch was claimed)."""
    teacher, limiter, budget = run.teacher, run.limiter, run.budget
    if job.uploads is None:
        _prepare(teacher, job, run.paths, run.cfg)
    if not job.ready:
        return []
    limiter.acquire()
    if budget.closed:  # checked after the wait for a slot, which may be long
        raise _NotSent()
    if job.result.requests == 0:
        job.result.reserved_used = len(job.ready)
    job.result.calls += len(job.ready)
    job.result.requests += 1
    t0 = time.monotonic()
    try:
        answers = teacher.classify(job.uploads)
    except DistillError:  # a rejected key: the other workers must not send another request
        budget.close()
        raise
    except TransientError as e:  # told here, not in the main thread: the others send meanwhile
        if e.status == 429:
            limiter.throttled()
        else:
            limiter.admitted()
            if e.status == 503:
                limiter.unavailable(run.policy.wait(e, 1))
            else:
                limiter.other_response()
        raise
    job.elapsed = time.monotonic() - t0
    if len(answers) != len(job.uploads):
        raise TransientError(f"teacher answered {len(answers)} of {len(job.uploads)} images")
    limiter.admitted()
    limiter.other_response()
    return answers


def _prepare(teacher, job: _Job, paths, cfg) -> None:
    job.uploads = []
    for sha in job.batch:
        try:
            with open(paths[sha], "rb") as f:
                data = f.read()
            job.uploads.append(prepare_upload(data, cfg.upload_size)[0] if teacher.remote else data)
            job.ready.append(sha)
        except Exception as e:  # the file changed or vanished since the scan
            job.result.responses.append(Response(sha, None, error=f"cannot read image: {type(e).__name__}",
                                                 attempts=0))


def _budget_message(budget: Budget) -> str:
    if budget.reason == "daily quota":
        now = dt.datetime.now(dt.timezone.utc)
        reset = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        hours = (reset - now).total_seconds() / 3600
        return f"daily quota reached; run again after 00:00 UTC (in {hours:.1f} h) to go on"
    return "--max-calls reached; run again (with a higher --max-calls) to go on"
