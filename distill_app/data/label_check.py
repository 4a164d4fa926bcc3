"""What a label map does to the cached answers: which teacher labels feed each class, how much
probability mass each class receives, and what falls outside (``distill cache labels --label-map``)."""

from __future__ import annotations

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
