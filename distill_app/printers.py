"""What each command prints on stderr for a person (its --json line is the machine's)."""

from __future__ import annotations

from pathlib import Path

from .console import err


def print_harvest(s: dict) -> None:
    verb = "would send" if s["dry_run"] else "sent"
    err.print(f"teacher {s['teacher']}  db {s['db']}", markup=False)
    err.print(
        f"files {s['files_found']}  images {s['images']}  already cached {s['already_cached']}  "
        f"{verb} {s['to_send'] if s['dry_run'] else s['sent']}  succeeded {s['succeeded']}  "
        f"failed {s['failed']}  skipped files {s['skipped_files']}", markup=False)
    for reason, n in {**s["failed_by_reason"], **s["skipped_by_reason"]}.items():
        err.print(f"  {n:6d}  {reason}", markup=False)
    speed = f"{s['images_per_s']:.2f} images/s"
    if s["dry_run"] or not s["sent"]:
        speed = ""
    elif s["load_s"] is not None:  # a local teacher: images, not requests, and loading apart
        speed += f" (model loaded in {s['load_s']:.1f}s)"
    else:
        speed += f"  {s['requests_per_s']:.2f} requests/s"
        if s["throttled"]:
            speed += f"  {s['throttled']} times HTTP 429, pacing at {s['final_rate']} requests/s"
        if s["paused_s"]:
            speed += f"  paused {s['paused_s']:.1f}s (HTTP 503 for every call)"
    err.print(
        f"calls today {s['calls_today']}  estimated cost ${s['estimated_cost_usd']:.4f}  "
        f"elapsed {s['elapsed_s']:.1f}s  {speed}".rstrip(), markup=False)
    sel = s.get("selection") or {}
    if sel.get("model"):  # a model strategy ran: what it cost, and how much the cache saved
        err.print(f"selected by {sel['strategy']} (round {sel.get('round', '-')}) with {sel['model']}: "
                  f"scored {sel['scored']}  from cache {sel['cached']}  unreadable {sel['unreadable']}  "
                  f"in {sel['seconds']:.1f}s", markup=False)
    if s.get("stopped"):
        err.print(f"stopped: {s['stopped']}", markup=False)


def print_eval(r: dict) -> None:
    from .deploy.report import headline_rows

    for name, value in headline_rows(r):
        err.print(f"{name:<40} {value}", markup=False)
    for row in r.get("per_class", []):
        err.print(f"  {row['class']:<24} n={row['n']:<5} accuracy={row['accuracy']}", markup=False)


def print_label_check(r: dict) -> None:
    err.print(f"{r['answers']} answers; the map covers {r['mapped_mass_share']:.1%} of the returned "
              f"mass and {r['mapped_top1_share']:.1%} of top-1 labels", markup=False)
    for c in r["classes"]:
        labels = ", ".join(f"{x['label']} ({x['mass']})" for x in c["labels"][:4]) or "NOTHING MAPPED"
        err.print(f"  {c['class']:<20} top-1 {c['top1']:6d}  mass {c['mass']:10.3f}  <- {labels}", markup=False)
    if r["unmapped"]:
        err.print("outside the map (top-1 count, mass):", markup=False)
        for u in r["unmapped"]:
            err.print(f"  {u['top1']:6d}  {u['mass']:10.3f}  {u['label']}", markup=False)


def label_counts(answers: dict) -> list[dict]:
    top1: dict[str, int] = {}
    mass: dict[str, float] = {}
    for scores in answers.values():
        if scores:
            top1[scores[0][0]] = top1.get(scores[0][0], 0) + 1
        for label, s in scores:
            mass[label] = mass.get(label, 0.0) + s
    rows = [{"label": k, "top1": top1.get(k, 0), "mass": round(v, 4)} for k, v in mass.items()]
    return sorted(rows, key=lambda r: (-r["top1"], -r["mass"]))


def print_export(r: dict) -> None:
    err.print(f"wrote {r['out']} ({r['file_bytes'] / 1e6:.2f} MB)", markup=False)
    c = r["check"]
    err.print(f"checked with {c['runtime']} on {c['inputs']}: max abs difference {c['max_abs_diff']:.2e}",
              markup=False)
    q = r.get("quantization")
    if q:
        err.print(f"calibrated on {q['calibration']['source']}; compared on {q['compared_on']['source']} "
                  f"({q['threads']} threads)", markup=False)
        for m in q["models"]:
            size = f"{m['file_bytes'] / 1e6:.2f} MB" if m["file_bytes"] else "-"
            err.print(f"  {m['name']:<18} accuracy {m['accuracy']}  agreement {m['agreement']}  "
                      f"batch 1 {m['ms_batch1']} ms  batch {m['batch']} {m['ms_batch']} ms  {size}", markup=False)
        err.print(f"accuracy change {q['accuracy_change']}  speed-up at batch 1 {q['speedup_batch1']}x "
                  f"({q['speedup_batch1_vs_pytorch']}x over PyTorch fp32)", markup=False)


def write_csv(path: Path, rows: list[dict], top_k: int) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "sha256", "error"] + [f"{what}_{i}" for i in range(1, top_k + 1)
                                                      for what in ("class", "probability")])
        for row in rows:
            ranked = [x for t in row.get("top", []) for x in (t["class"], t["probability"])]
            writer.writerow([row["path"], row.get("sha256", ""), row.get("error", "")] + ranked)


def print_epoch(epoch: int, epochs: int, m: dict) -> None:
    phase = f"  {m['dsd_phase']} ({m['sparsity']:.0%} zero)" if "dsd_phase" in m else ""  # --dsd
    run = f"{m['run']} " if m.get("run") else ""  # --unlabeled noisy: the labeller's epochs come first
    err.print(f"{run}epoch {epoch}/{epochs}  train loss {m['train_loss']:.4g}  val accuracy {m['val_accuracy']:.1%}  "
              f"agreement {m['val_agreement']:.1%}  {m['images_per_s']:.0f} images/s  {m['epoch_seconds']:.1f}s{phase}",
              markup=False)


def print_trained(s: dict) -> None:
    # best_epoch: the epoch model.pt holds (--keep last: the final one; the JSON key predates --keep)
    best = (f"model.pt from epoch {s['best_epoch']}: val accuracy {s['val_accuracy']:.1%}, agreement {s['agreement']:.1%}"
            if s.get("best_epoch") else "no epoch finished")
    err.print(f"trained {s['out']}: {s['epochs']} epochs in {s['seconds']:.0f}s; {best}", markup=False)
    err.print(f"  {s['images']['train']} training + {s['images']['val']} validation images, {s['classes']} classes, "
              f"weights {s['weights']}; {s['unanswered']} unanswered, {s['unmapped']} unmapped, "
              f"{s['skipped']} files skipped", markup=False)
    if s.get("labeller"):  # --unlabeled auto|noisy: Noisy Student's first run
        lab = s["labeller"]
        err.print(f"  Noisy Student: {s['unlabeled_used']} unanswered images labelled by {lab['out']} "
                  f"(val accuracy {lab['val_accuracy']:.1%}, agreement {lab['agreement']:.1%}, {lab['seconds']:.0f}s)",
                  markup=False)


def print_compressed(r: dict) -> None:
    """The paper's table: size and accuracy after each stage."""
    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    err.print(f"{'stage':<20} {'size':>10} {'smaller':>8} {'val accuracy':>13} {'agreement':>10}", markup=False)
    for s in r["stages"]:
        err.print(f"{s['stage']:<20} {s['bytes'] / 1e6:>8.3f}MB {s['ratio']:>7.1f}x {pct(s['val_accuracy']):>13} "
                  f"{pct(s['val_agreement']):>10}", markup=False)
    where = f"on {r['val_images']} validation images" if r["val_images"] is not None else "no scores: no training store"
    err.print(f"wrote {r['out']} ({r['file_bytes']:,} bytes; {where})", markup=False)
