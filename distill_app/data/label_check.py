"""Label maps against the cached answers: what a map covers (which teacher labels feed each
class, how much mass each receives, what falls outside: ``distill cache labels --label-map``), and
a draft map from class folders (``distill labels suggest``, ``--label-map folders``)."""

from __future__ import annotations

import json
from collections import defaultdict

from .targets import Answers, LabelMap


def check_label_map(answers: Answers, label_map: LabelMap, top: int = 20) -> dict:
    """Coverage of ``label_map`` over ``answers`` (sha256 -> [(label, score)]).

    Returns per class: images whose teacher top-1 label feeds it, total mass, and the teacher
    labels that matched (with their mass); the ``top`` unmapped labels by mass; and the share of
    all returned mass and of top-1 answers that the map covers.
    """
    per_class = {c: {"class": c, "top1": 0, "mass": 0.0, "labels": defaultdict(float)}
                 for c in label_map.classes}
    unmapped: dict[str, list] = defaultdict(lambda: [0, 0.0])  # label -> [top-1 count, mass]
    total_mass = mapped_mass = 0.0
    mapped_top1 = 0
    for scores in answers.values():
        for rank, (label, score) in enumerate(scores):
            score = float(score)
            total_mass += score
            i = label_map.index(label)
            if i < 0:
                unmapped[label][0] += rank == 0
                unmapped[label][1] += score
                continue
            row = per_class[label_map.classes[i]]
            row["mass"] += score
            row["labels"][label] += score
            row["top1"] += rank == 0
            mapped_mass += score
            mapped_top1 += rank == 0
    classes = []
    for row in per_class.values():
        labels = sorted(row["labels"].items(), key=lambda kv: -kv[1])
        classes.append({**row, "mass": round(row["mass"], 4),
                        "labels": [{"label": k, "mass": round(v, 4)} for k, v in labels]})
    outside = sorted(unmapped.items(), key=lambda kv: -kv[1][1])[:top]
    n = len(answers)
    return {
        "answers": n,
        "classes": classes,
        "empty_classes": [c["class"] for c in classes if not c["labels"]],
        "mapped_mass_share": round(mapped_mass / total_mass, 4) if total_mass else None,
        "mapped_top1_share": round(mapped_top1 / n, 4) if n else None,
        "unmapped": [{"label": k, "top1": v[0], "mass": round(v[1], 4)} for k, v in outside],
    }


# -- a draft label map from class folders ---------------------------------------------------------


def suggest_label_map(answers: Answers, folders: dict[str, str | None], min_share: float = 0.05) -> dict:
    """A draft label map: per class folder, the teacher labels carrying at least ``min_share`` of
    the mass the teacher returned for that folder's images (at least its biggest label).

    ``folders``: sha256 -> folder label (None: not in a class folder, ignored). A label that
    passes in several folders goes to the one where its share is highest; the others list it
    under ``shared`` (it cannot feed two classes). Returns ``{"classes": {folder: [{"label",
    "share"}, ...]}, "images": {folder: n}, "shared": {folder: [{"label", "share", "kept_in"}]}}``.
    """
    mass: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    images: dict[str, int] = defaultdict(int)
    for sha, scores in answers.items():
        folder = folders.get(sha)
        if folder is None:
            continue
        images[folder] += 1
        for label, score in scores:
            mass[folder][label] += float(score)
    shares = {}
    for folder, labels in mass.items():
        total = sum(labels.values()) or 1.0
        ranked = sorted(((s / total, label) for label, s in labels.items()), key=lambda p: (-p[0], p[1]))
        shares[folder] = [(label, share) for share, label in ranked if share >= min_share] or [ranked[0][::-1]]
    best_home: dict[str, tuple[float, str]] = {}
    for folder, picked in shares.items():
        for label, share in picked:
            if share > best_home.get(label, (-1.0, ""))[0]:
                best_home[label] = (share, folder)
    classes: dict[str, list[dict]] = {}
    shared: dict[str, list[dict]] = {}
    for folder in sorted(shares):
        for label, share in shares[folder]:
            home = best_home[label][1]
            entry = {"label": label, "share": round(share, 4)}
            (classes.setdefault(folder, []) if home == folder else shared.setdefault(folder, [])).append(
                entry if home == folder else {**entry, "kept_in": home})
        classes.setdefault(folder, [])
    return {"classes": classes, "images": dict(images), "shared": shared}


def render_toml(suggestion: dict, origin: str) -> str:
    """The suggestion as a TOML label map, each label's share of its folder's mass in a comment."""
    lines = [f"# Draft label map from {origin}.",
             "# Per class folder, the teacher labels that carry most of its answered mass (their share in",
             "# the comment). Check it, then train with --label-map FILE.", ""]
    for folder, labels in suggestion["classes"].items():
        lines.append(f"# {folder}: {suggestion['images'].get(folder, 0)} answered images")
        for s in suggestion["shared"].get(folder, []):
            lines.append(f"#   also {json.dumps(s['label'])} ({s['share']:.1%}), kept in {s['kept_in']}")
        if not labels:
            lines.append(f"#   every label of {folder} is kept in another class: merge the folders or edit by hand")
        lines.append(f"{_key(folder)} = [")
        lines += [f"    {json.dumps(x['label'])},  # {x['share']:.1%}" for x in labels]
        lines += ["]", ""]
    return "\n".join(lines)


def _key(name: str) -> str:
    """A TOML key: bare when it can be, else a quoted string (JSON escapes are TOML's too)."""
    return name if name and all(c.isalnum() or c in "-_" for c in name) and name.isascii() else json.dumps(name)


def folder_label_map(suggestion: dict) -> LabelMap:
    """The suggestion applied as it is (``--label-map folders``); a folder left with no label of
    its own is dropped (its images then count as unmapped)."""
    kept = {folder: [x["label"] for x in labels] for folder, labels in suggestion["classes"].items() if labels}
    return LabelMap.from_dict(kept, origin="the label map suggested from the class folders")
