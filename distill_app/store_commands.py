"""The store's sub-commands, ``distill cache stats|labels|export`` and ``distill labels suggest``:
they read the SQLite store and the images, never torch (cli.py mounts them on the app)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from cache import open_store

from . import printers
from .console import emit_json, err, user_errors
from .errors import DistillError

cache_app = typer.Typer(help="Look inside the soft-label store.", no_args_is_help=True)
labels_app = typer.Typer(help="Label maps: draft one from class folders.", no_args_is_help=True)

DB_HELP = "SQLite store (default: $DISTILL_DB or ./distill.db)."
JSON_HELP = "Print one JSON object as the last line of stdout."


@cache_app.command("stats")
@user_errors
def cache_stats(
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Images, answers, failures and calls in the store, and how each teacher's budget was spent:
    the images chosen per harvest round and --select strategy.

    Example: distill cache stats --db distill.db
    """
    store = open_store(db, create=False)
    try:
        stats = store.stats()
        chosen = store.selection_counts()
    finally:
        store.close()
    err.print(f"{stats['db']}: {stats['images']} images ({stats['labelled_images']} in class folders)",
              markup=False)
    for t in stats["teachers"]:
        err.print(f"  {t['spec']:<32} ok {t['ok']}  failed {t['failed']}  claimed {t['claimed']}  "
                  f"calls {t['calls']}  ${t['cost_usd']}", markup=False)
        t["selections"] = [{k: v for k, v in row.items() if k != "teacher"} for row in chosen
                           if row["teacher"] == t["spec"]]
        for s in t["selections"]:
            selector = f"  selector {s['selector']}" if s["selector"] else ""
            err.print(f"    round {s['round']:<3} {s['strategy']:<12} chosen {s['images']}  answered "
                      f"{s['answered']}{selector}", markup=False)
    if json_out:
        emit_json(stats)


@cache_app.command("labels")
@user_errors
def cache_labels(
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    teacher: str = typer.Option("local", help="Teacher spec."),
    label_map: Optional[Path] = typer.Option(None, help="Check this label map against the answers."),
    limit: int = typer.Option(30, min=1, help="How many labels to list."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The teacher's vocabulary as seen in its answers (top-1 count, total score), or with
    --label-map, what the map covers: labels and mass per class, and what falls outside.

    Example: distill cache labels --teacher local --label-map classes.toml
    """
    from .teachers.spec import stored_teacher

    store = open_store(db, create=False)
    try:
        answers = store.answers(stored_teacher(store, teacher)["id"])
    finally:
        store.close()
    if label_map:
        from .data.label_check import check_label_map
        from .data.targets import load_label_map

        report = check_label_map(answers, load_label_map(label_map), top=limit)
        printers.print_label_check(report)
        if json_out:
            emit_json(report)
        return
    rows = printers.label_counts(answers)
    for row in rows[:limit]:
        err.print(f"  {row['top1']:6d}  {row['mass']:10.3f}  {row['label']}", markup=False)
    if json_out:
        emit_json({"teacher": teacher, "labels": rows[:limit], "distinct_labels": len(rows)})


@cache_app.command("export")
@user_errors
def cache_export(
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    teacher: Optional[str] = typer.Option(None, help="Only this teacher's answers."),
) -> None:
    """Every stored answer as JSON Lines on stdout (sha256, path, label, teacher, status, scores).

    Example: distill cache export > answers.jsonl
    """
    store = open_store(db, create=False)
    try:
        for row in store.export_rows(teacher):
            sys.stdout.write(json.dumps(row) + "\n")
    finally:
        store.close()


@labels_app.command("suggest")
@user_errors
def labels_suggest(
    images: Path = typer.Option(..., help="Folder of class subfolders, harvested."),
    db: Optional[str] = typer.Option(None, help=DB_HELP),
    teacher: str = typer.Option("local", help="Teacher spec whose answers to read."),
    min_share: float = typer.Option(0.05, min=0.0, max=1.0, help="Keep a teacher label when it carries at least "
                                    "this share of a folder's answered mass."),
    out: Optional[Path] = typer.Option(None, help="Write the TOML here (default: print it on stdout)."),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Draft a label map (TOML) from class folders: per folder, the teacher labels that carry most of its mass.

    Example: distill labels suggest --images photos/ --out labels.toml && distill train --images photos/ --label-map labels.toml
    """
    from .data.images import list_images
    from .data.label_check import render_toml, suggest_label_map
    from .teachers.spec import stored_teacher

    found = list_images(images)
    folders = dict(zip(found.shas, found.labels))
    if not any(folders.values()):
        raise DistillError(f"no class subfolders under {images}: a label map is drafted per folder")
    store = open_store(db, create=False)
    try:
        answers = store.answers(stored_teacher(store, teacher)["id"], found.shas)
    finally:
        store.close()
    if not answers:
        raise DistillError(f"no answers from {teacher} for the images under {images}: run `distill harvest "
                           f"--images {images} --teacher {teacher}` first")
    suggestion = suggest_label_map(answers, folders, min_share)
    text = render_toml(suggestion, f"{len(answers)} answers of {teacher} for {images}")
    if out:
        out.write_text(text, encoding="utf-8")
        err.print(f"wrote {out}: {len(suggestion['classes'])} classes", markup=False)
    elif not json_out:
        sys.stdout.write(text)
    for folder, shared in suggestion["shared"].items():
        for s in shared:
            err.print(f"note: {s['label']!r} feeds {folder} ({s['share']:.1%}) and {s['kept_in']}; kept in "
                      f"{s['kept_in']}", markup=False)
    if json_out:
        emit_json(suggestion)
