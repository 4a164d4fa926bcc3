"""The soft-label store: images by content hash, teacher answers, usage. SQLite via sqlite-utils.

Every write is a short transaction so a killed process loses at most what was in flight.
Claims (status ``claimed`` with a lease) let several harvesters share one database without
paying twice for an image: a claim is taken in a ``BEGIN IMMEDIATE`` transaction, and a claim
whose lease ran out (its owner died) may be taken again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import itertools
import json
import os
import random
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import sqlite_utils

from .migrations import migrate

DEFAULT_DB = "distill.db"
OK, FAILED, CLAIMED = "ok", "failed", "claimed"
T = TypeVar("T")


class StoreError(Exception):
    """The database cannot be used (locked, corrupt, unwritable); message says what to do."""


@dataclass
class ImageRow:
    sha256: str
    path: str
    width: int
    height: int
    bytes: int
    label: str | None = None  # the class folder the file was found in, if any


@dataclass
class Response:
    """A teacher's answer for one image, as stored. ``scores`` None means a failure."""

    image: str
    scores: list[tuple[str, float]] | None
    raw: str | None = None
    http_status: int | None = None
    error: str | None = None
    latency_ms: float = 0.0
    attempts: int = 1


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or utc_now()).strftime("%Y-%m-%d")


def default_db_path() -> str:
    return os.environ.get("DISTILL_DB") or DEFAULT_DB


class Store:
    """One SQLite file. Open with :func:`open_store`; migrations run on open."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path, self.timeout = str(path), timeout
        try:
            self.db = self._retrying(self._open)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a distill database ({e}); pass another --db") from None

    def _open(self) -> sqlite_utils.Database:
        """Connect, switch to WAL and migrate; the connection is closed again if any step fails."""
        conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False)
        try:
            db = sqlite_utils.Database(conn)
            db.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if db.journal_mode != "wal":
                db.enable_wal()
            db.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; fsync per checkpoint
            db.execute("PRAGMA foreign_keys = ON")
            migrate(db)
            return db
        except BaseException:
            conn.close()
            raise

    def _retrying(self, action: Callable[[], T]) -> T:
        """``action()``, started again while SQLite answers BUSY and the timeout is not spent.

        The busy timeout makes SQLite wait for most locks itself, but some BUSY answers skip it by
        design (deadlock avoidance between two lock upgrades, a WAL snapshot gone stale); SQLite's
        documented remedy is to start again. CI saw one of two harvests opening a new database at
        once fail with "locked" (tests/test_harvest_crash.py; not reproduced here in 23 runs of it,
        nor in 70 rounds of 3 to 6 processes opening one new database), so opening and BEGIN
        IMMEDIATE retry until the timeout rather than fail at the first BUSY. Any other
        OperationalError, or BUSY past the timeout, is a StoreError saying what to do."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return action()
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() >= deadline:
                    raise StoreError(_explain(e, self.path)) from None
            time.sleep(random.uniform(0.02, 0.2))  # jittered: two retrying processes must not stay in step

    def close(self) -> None:
        self.db.conn.close()

    # -- transactions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def immediate(self) -> Iterator[None]:
        """A write transaction that takes the write lock up front (no deadlock on upgrade)."""
        self._retrying(lambda: self.db.conn.execute("BEGIN IMMEDIATE"))
        try:
            yield
        except BaseException:
            self.db.conn.rollback()
            raise
        self.db.conn.execute("COMMIT")

    # -- images -------------------------------------------------------------------------------

    def add_images(self, rows: Iterable[ImageRow]) -> int:
        """Record images and their paths; an image already known keeps its first path."""
        rows = list(rows)
        now = utc_now().isoformat()
        with self.immediate():
            self.db["images"].insert_all(
                ({**vars(r), "added_at": now} for r in rows), ignore=True, batch_size=500
            )
            self.db["paths"].upsert_all(
                ({"path": r.path, "sha256": r.sha256, "label": r.label} for r in rows),
                pk="path", batch_size=500,
            )
        return len(rows)

    def image_labels(self, shas: Iterable[str] | None = None) -> dict[str, str | None]:
        """sha256 -> folder label (None when the image was not in a class folder)."""
        return {r[0]: r[1] for r in self._select_in("SELECT sha256, label FROM images", "sha256", shas)}

    def image_paths(self, shas: Iterable[str] | None = None) -> dict[str, str]:
        return {r[0]: r[1] for r in self._select_in("SELECT sha256, path FROM images", "sha256", shas)}

    # -- teachers -----------------------------------------------------------------------------

    def teacher_id(self, spec: str, score_kind: str, options: dict | None = None) -> int:
        """The id of teacher ``spec``, created on first use."""
        row = self.db.execute("SELECT id FROM teachers WHERE spec = ?", [spec]).fetchone()
        if row:
            return row[0]
        with self.immediate():
            self.db.execute(
                "INSERT OR IGNORE INTO teachers (spec, score_kind, options) VALUES (?, ?, ?)",
                [spec, score_kind, json.dumps(options or {}, sort_keys=True)],
            )
        return self.db.execute("SELECT id FROM teachers WHERE spec = ?", [spec]).fetchone()[0]

    def teachers(self) -> list[dict]:
        return list(self.db["teachers"].rows)

    def find_teacher(self, spec: str) -> dict | None:
        rows = list(self.db["teachers"].rows_where("spec = ?", [spec]))
        return rows[0] if rows else None

    # -- claims and answers -------------------------------------------------------------------

    def answered(self, teacher: int, shas: Iterable[str] | None = None) -> set[str]:
        """Images with a stored successful answer from ``teacher``: never sent again."""
        sql = "SELECT image FROM responses WHERE teacher = ? AND status = 'ok'"
        return {r[0] for r in self._select_in(sql, "image", shas, [teacher])}

    def claim(self, teacher: int, shas: list[str], owner: str, lease_s: float,
              selection: dict | None = None) -> list[str]:
        """Claim the images nobody has answered or holds a live claim on; returns those claimed.
        ``selection`` (round, ranks: sha256 -> rank, strategy, selector, seed): record why they
        were chosen in the same transaction. Recorded in a second transaction per batch, two
        harvesters on one store failed with "database is locked" in 2 of 6 runs of
        tests/test_harvest_crash.py; in this one, in none of 6 (cause not pinned down)."""
        now = time.time()
        claimed = []
        with self.immediate():
            self._claim_rows(teacher, shas, owner, now + lease_s, claimed)
            if selection and claimed:
                self._insert_selections(teacher, selection["round"],
                                        [(sha, selection["ranks"][sha]) for sha in claimed],
                                        selection["strategy"], selection.get("selector"), selection.get("seed"))
        return claimed

    def _claim_rows(self, teacher: int, shas: list[str], owner: str, until: float, claimed: list[str]) -> None:
        """Inside claim's transaction: claim each free image of ``shas`` until ``until``."""
        now = time.time()
        for sha in shas:
            row = self.db.execute(
                "SELECT status, claimed_until FROM responses WHERE image = ? AND teacher = ?",
                [sha, teacher],
            ).fetchone()
            if row and (row[0] == OK or (row[0] == CLAIMED and (row[1] or 0) > now)):
                continue
            self.db.execute(
                "INSERT INTO responses (image, teacher, status, claim_owner, claimed_until, attempts)"
                " VALUES (?, ?, 'claimed', ?, ?, 0) ON CONFLICT (image, teacher) DO UPDATE SET"
                " status = 'claimed', claim_owner = excluded.claim_owner,"
                " claimed_until = excluded.claimed_until",
                [sha, teacher, owner, until],
            )
            claimed.append(sha)

    def release(self, teacher: int, shas: Iterable[str], owner: str) -> None:
        """Give back claims that were never sent (a budget was reached, the run was stopped)."""
        where = "image = ? AND teacher = ? AND status = 'claimed' AND claim_owner = ?"
        with self.immediate():
            for sha in shas:
                args = [sha, teacher, owner]
                # A first claim leaves no trace; a retry claim goes back to its earlier failure.
                self.db.execute(f"DELETE FROM responses WHERE {where} AND error IS NULL", args)
                self.db.execute(
                    f"UPDATE responses SET status = 'failed', claimed_until = NULL WHERE {where}", args
                )

    def claim_owners(self, teacher: int) -> list[str]:
        """The harvesters holding claims on ``teacher``'s images, live or dead."""
        rows = self.db.execute(
            "SELECT DISTINCT claim_owner FROM responses WHERE teacher = ? AND status = 'claimed'",
            [teacher],
        ).fetchall()
        return [r[0] for r in rows if r[0]]

    def release_owner(self, teacher: int, owner: str) -> None:
        """Give back every claim ``owner`` still holds."""
        rows = self.db.execute(
            "SELECT image FROM responses WHERE teacher = ? AND status = 'claimed' AND claim_owner = ?",
            [teacher, owner],
        ).fetchall()
        self.release(teacher, [r[0] for r in rows], owner)

    def record(self, teacher: int, responses: Iterable[Response]) -> None:
        """Store answers (successes and failures) in one transaction."""
        now = utc_now().isoformat()
        rows = []
        for r in responses:
            ok = r.scores is not None
            rows.append({
                "image": r.image, "teacher": teacher, "status": OK if ok else FAILED,
                "http_status": r.http_status, "raw": r.raw,
                "scores": json.dumps([[lab, float(s)] for lab, s in r.scores]) if ok else None,
                "error": None if ok else (r.error or "unknown error"),
                "latency_ms": r.latency_ms, "attempts": r.attempts, "answered_at": now,
                "claim_owner": None, "claimed_until": None,
            })
        with self.immediate():
            self.db["responses"].upsert_all(rows, pk=("image", "teacher"), batch_size=200)

    def answers(self, teacher: int, shas: Iterable[str] | None = None) -> dict[str, list[tuple[str, float]]]:
        """sha256 -> [(label, score), ...] for every successful answer of ``teacher``."""
        sql = "SELECT image, scores FROM responses WHERE teacher = ? AND status = 'ok'"
        rows = list(self._select_in(sql, "image", shas, [teacher]))
        with _gc_paused():
            return {sha: [(lab, s) for lab, s in json.loads(text)] for sha, text in rows}

    def failures(self, teacher: int) -> dict[str, int]:
        """Failure reason -> count, for ``teacher``."""
        rows = self.db.execute(
            "SELECT error, COUNT(*) FROM responses WHERE teacher = ? AND status = 'failed'"
            " GROUP BY error ORDER BY 2 DESC", [teacher]
        ).fetchall()
        return dict(rows)

    # -- usage --------------------------------------------------------------------------------

    def add_usage(self, teacher: int, calls: int, cost: float = 0.0, day: str | None = None) -> None:
        # Raw SQL rather than sqlite-utils upsert: the counter must be incremented atomically,
        # not replaced, when two harvesters share the database.
        with self.immediate():
            self.db.execute(
                "INSERT INTO usage (day, teacher, calls, cost) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (day, teacher) DO UPDATE SET calls = calls + excluded.calls,"
                " cost = cost + excluded.cost",
                [day or utc_day(), teacher, calls, cost],
            )

    def calls_on(self, teacher: int, day: str | None = None) -> int:
        row = self.db.execute(
            "SELECT calls FROM usage WHERE day = ? AND teacher = ?", [day or utc_day(), teacher]
        ).fetchone()
        return row[0] if row else 0

    # -- selections ---------------------------------------------------------------------------

    def last_selection_round(self, teacher: int) -> int:
        """The highest selection round recorded for ``teacher``; 0 before the first."""
        row = self.db.execute("SELECT MAX(round) FROM selections WHERE teacher = ?", [teacher]).fetchone()
        return row[0] or 0

    def add_selections(self, teacher: int, round_: int, ranked: Iterable[tuple[str, int]], strategy: str,
                       selector: str | None = None, seed: int | None = None) -> None:
        """Record images ``(sha256, rank)`` chosen for sending in ``round_``. An image already
        recorded in that round keeps its first row (a batch put back and claimed again)."""
        with self.immediate():
            self._insert_selections(teacher, round_, ranked, strategy, selector, seed)

    def _insert_selections(self, teacher: int, round_: int, ranked: Iterable[tuple[str, int]], strategy: str,
                           selector: str | None, seed: int | None) -> None:
        now = utc_now().isoformat()
        for sha, rank in ranked:
            self.db.execute(
                "INSERT OR IGNORE INTO selections (image, teacher, strategy, round, rank, selector, seed,"
                " selected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [sha, teacher, strategy, round_, rank, selector, seed, now])

    def selections(self, teacher: int | None = None, round_: int | None = None) -> list[dict]:
        """Recorded selections (image, teacher, strategy, round, rank, selector, seed, selected_at),
        by teacher, round and rank; optionally of one teacher and one round only."""
        where, params = [], []
        for column, value in (("teacher", teacher), ("round", round_)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM selections" + (" WHERE " + " AND ".join(where) if where else "")
        return list(self.db.query(sql + " ORDER BY teacher, round, rank", params))

    def selection_counts(self) -> list[dict]:
        """How the budget was spent, for ``distill cache stats``: one row per teacher (spec), round,
        strategy, selector and seed, with the images chosen for sending then and how many of them
        hold an answer now (``answered``: a failure, or a claim killed in flight, is not one, and an
        image chosen again in a later round counts in both). By teacher, then round."""
        return list(self.db.query(
            "SELECT t.spec AS teacher, s.round, s.strategy, s.selector, s.seed, COUNT(*) AS images,"
            " COALESCE(SUM(r.status = 'ok'), 0) AS answered"
            " FROM selections s JOIN teachers t ON t.id = s.teacher"
            " LEFT JOIN responses r ON r.image = s.image AND r.teacher = s.teacher"
            " GROUP BY s.teacher, s.round, s.strategy, s.selector, s.seed"
            " ORDER BY s.teacher, s.round, s.strategy"))

    # -- summaries ----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counts for ``distill cache stats``."""
        q = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        per_teacher = []
        for t in self.teachers():
            counts = dict(self.db.execute(
                "SELECT status, COUNT(*) FROM responses WHERE teacher = ? GROUP BY status", [t["id"]]
            ).fetchall())
            calls = self.db.execute(
                "SELECT COALESCE(SUM(calls), 0), COALESCE(SUM(cost), 0) FROM usage WHERE teacher = ?",
                [t["id"]],
            ).fetchone()
            per_teacher.append({
                "spec": t["spec"], "score_kind": t["score_kind"], "ok": counts.get(OK, 0),
                "failed": counts.get(FAILED, 0), "claimed": counts.get(CLAIMED, 0),
                "calls": calls[0], "cost_usd": round(calls[1], 6),
            })
        return {
            "db": self.path,
            "images": q("SELECT COUNT(*) FROM images"),
            "paths": q("SELECT COUNT(*) FROM paths"),
            "labelled_images": q("SELECT COUNT(*) FROM images WHERE label IS NOT NULL"),
            "teachers": per_teacher,
        }

    def export_rows(self, teacher_spec: str | None = None) -> Iterator[dict]:
        """Every stored answer (sha256, path, label, teacher, status, http_status, error, scores),
        ordered by image, optionally of one teacher only: ``distill cache export``."""
        sql = ("SELECT r.image, i.path, i.label, t.spec, r.status, r.http_status, r.error, r.scores"
               " FROM responses r JOIN images i ON i.sha256 = r.image JOIN teachers t ON t.id = r.teacher")
        params: list = []
        if teacher_spec:
            sql += " WHERE t.spec = ?"
            params.append(teacher_spec)
        keys = ("sha256", "path", "label", "teacher", "status", "http_status", "error")
        for row in self.db.execute(sql + " ORDER BY r.image", params):
            yield {**dict(zip(keys, row[:7])), "scores": json.loads(row[7]) if row[7] else None}

    # -- helpers ------------------------------------------------------------------------------

    def _select_in(self, sql: str, column: str, values: Iterable[str] | None, params=()) -> list:
        """Rows of ``sql``, optionally restricted to ``column IN values``."""
        params = list(params)
        if values is None:
            return self.db.execute(sql, params).fetchall()
        values = list(values)
        joiner = " AND " if " WHERE " in sql else " WHERE "
        if len(values) <= _MAX_PARAMS:
            marks = ",".join("?" * len(values))
            return self.db.execute(f"{sql}{joiner}{column} IN ({marks})", params + values).fetchall()
        # Many values go through a temporary table: as chunks of IN (...), SQLite's planner
        # scanned the teacher's whole index once per chunk (7 s for 100,000 images, 0.4 s so).
        table = f"_values_{next(_TEMP_TABLES)}"
        # The INSERT opens an implicit transaction (Python's sqlite3); left open, the next
        # BEGIN IMMEDIATE would fail. Ended here unless a caller's transaction was open already.
        outside = not self.db.conn.in_transaction
        self.db.execute(f"CREATE TEMP TABLE {table} (v TEXT PRIMARY KEY) WITHOUT ROWID")
        try:
            self.db.conn.executemany(f"INSERT OR IGNORE INTO temp.{table} VALUES (?)", ((v,) for v in values))
            return self.db.execute(f"{sql}{joiner}{column} IN (SELECT v FROM temp.{table})", params).fetchall()
        finally:
            self.db.execute(f"DROP TABLE temp.{table}")
            if outside and self.db.conn.in_transaction:
                self.db.conn.commit()


_MAX_PARAMS = 900  # under SQLite's default limit on bound parameters (999 before 3.32)
_TEMP_TABLES = itertools.count()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building millions of small objects (labels, scores) with the cyclic collector on costs
    more than the parsing itself: it walks every one of them again and again. None of them can
    be in a cycle, so it waits until they are built."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_busy(e: sqlite3.Error) -> bool:
    msg = str(e)
    return "locked" in msg or "busy" in msg


def _explain(e: sqlite3.Error, path: str) -> str:
    msg = str(e)
    if _is_busy(e):
        code = getattr(e, "sqlite_errorname", None)  # e.g. SQLITE_BUSY_SNAPSHOT: says which lock
        detail = f" ({code})" if code and code != "SQLITE_BUSY" else ""
        return (f"database {path} is locked by another process{detail}; "
                "wait for it to finish or use another --db")
    if "unable to open" in msg:
        return f"cannot open database {path}: check the folder exists and is writable"
    if "disk" in msg and "full" in msg:
        return f"disk full while writing {path}: free some space and run again (nothing was lost)"
    return f"database {path}: {msg}"


def open_store(path: str | None = None, timeout: float = 30.0, create: bool = True) -> Store:
    """Open (creating and migrating) the store at ``path`` or ``$DISTILL_DB`` or ./distill.db.

    ``create=False`` is for commands that only read: a missing file is a StoreError (a typo in
    ``--db`` must not leave an empty database behind).
    """
    path = path or default_db_path()
    if not create and not os.path.exists(path):
        raise StoreError(f"no database at {path}: run `distill harvest` first, or pass --db (or set DISTILL_DB)")
    return Store(path, timeout=timeout)
