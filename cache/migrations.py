"""Ordered schema migrations, recorded in ``_migrations`` and run by every open of the store.

Append new migrations at the end; never edit one that has shipped (a database in the field
has already recorded it by name).
"""

from __future__ import annotations

import datetime as dt
from typing import Callable

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    # images: one row per distinct content (SHA-256 of the file bytes).
    db["images"].create(
        {"sha256": str, "path": str, "width": int, "height": int, "bytes": int,
         "label": str, "added_at": str},
        pk="sha256",
    )
    # paths: every file name seen for an image (the same photo under two names is one image).
    db["paths"].create({"path": str, "sha256": str, "label": str}, pk="path",
                       foreign_keys=[("sha256", "images", "sha256")])
    db["paths"].create_index(["sha256"])
    db["teachers"].create({"id": int, "spec": str, "score_kind": str, "options": str}, pk="id")
    db["teachers"].create_index(["spec"], unique=True)
    # responses: one row per (image, teacher). status: ok | failed | claimed.
    db["responses"].create(
        {"image": str, "teacher": int, "status": str, "http_status": int, "raw": str,
         "scores": str, "error": str, "latency_ms": float, "attempts": int,
         "answered_at": str, "claim_owner": str, "claimed_until": float},
        pk=("image", "teacher"),
        foreign_keys=[("image", "images", "sha256"), ("teacher", "teachers", "id")],
    )
    db["responses"].create_index(["teacher", "status"])
    # usage: calls sent per UTC day and teacher, for --daily-quota across runs.
    db["usage"].create({"day": str, "teacher": int, "calls": int, "cost": float},
                       pk=("day", "teacher"))


@migration
def m002_selections(db: sqlite_utils.Database) -> None:
    # selections: which images a harvest chose to send, and why (harvest/select.py). One row per
    # image claimed for sending; round counts the harvests of one teacher that chose any (1, 2, ...);
    # rank is the image's place in that run's order (1 = chosen first); selector is the student
    # run that scored the images (NULL: none, e.g. random, or diversity on the local teacher).
    db["selections"].create(
        {"image": str, "teacher": int, "strategy": str, "round": int, "rank": int,
         "selector": str, "seed": int, "selected_at": str},
        pk=("teacher", "round", "image"),
        foreign_keys=[("image", "images", "sha256"), ("teacher", "teachers", "id")],
    )


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply the migrations this database has not recorded yet; returns their names."""
    # BEGIN IMMEDIATE: two processes opening a new database at once must not both migrate.
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
        done = {row[0] for row in db.execute("SELECT name FROM _migrations").fetchall()}
        applied = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            fn(db)
            now = dt.datetime.now(dt.timezone.utc).isoformat()
            db.execute("INSERT INTO _migrations VALUES (?, ?)", [fn.__name__, now])
            applied.append(fn.__name__)
        db.conn.execute("COMMIT")
    except BaseException:
        db.conn.rollback()
        raise
    return applied
