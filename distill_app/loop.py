"""``distill loop``: the active-learning cycle in one command, resumable. Each of ``rounds`` rounds
brings the answered images up to ``budget * round / rounds`` (harvest, ordered by ``select`` with
the previous round's student as the selector), then trains a student on all answers so far into
``out/round-<r>``. Round 1 has no student yet: on the local EfficientNet-Lite0's features it
takes a k-center sample when ``select`` is diversity, a typical one (``typical``) when it is
typical or hybrid, else a random one. Hybrid starts typical because k-center's first picks are
the pool's outliers: on Imagenette its 250-photo round-1 students were 6 points (ImageNet init)
to 18 points (random init) below random's (BENCHMARKS.md, active selection). With
``warm_start`` each later round starts from the previous round's student (by default when round
1 started from random init). The last round's student, the one delivered, also learns from the
photos no call reached (``unlabeled``, default auto: Noisy Student, as ``distill train`` does);
earlier rounds train on their answers alone.

Nothing is paid twice: a round's calls are what its target lacks, counted from the store on every
run, so a killed loop rerun with the same command sends only what is still missing; a round whose
training finished is not trained again (its ``last.pt`` is resumed, which runs no epoch), and a
round that finished altogether (its ``round.json`` written) is read back, not run: its row keeps
the images it was trained on, with ``sent`` 0 (what this invocation paid).
Like ``demo``, this strings commands together; it holds no harvest or training logic of its own.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import DistillError

# Later rounds select with the latest student. For typical too: keeping the local model's features in
# every round (TypiClust's fixed embedding) ended 1,000-call loops at 40.1% and 44.9% (seeds 0, 1)
# against 50.0% with the student's on seed 0, and random's 46.6% and 46.1% (BENCHMARKS.md).
MODEL_BASED = ("uncertainty", "diversity", "typical", "hybrid")
FIRST_ROUND = {"diversity": "diversity", "typical": "typical", "hybrid": "typical"}  # else random
ROUND_FILE = "round.json"  # in out/round-<r>: the finished round's row
# The default strategy: typical led random in every random-init setting measured on Imagenette (3 seeds, 4
# rounds; warm-started: +5.8 points at 500 calls, +1.3 at 1,000) and was level with ImageNet init (-0.1 at
# 500, +0.6 at 1,000), where uncertainty, the default before, gave -0.5 and +0.9 (BENCHMARKS.md).
DEFAULT_SELECT = "typical"
# Every round keeps train's default epoch (best-on-validation for a supervised round, as SPEC has it).
# Tried and reverted: rounds before the last handing over their final epoch. Their own students were
# better (+0.9 points over 18 rounds, +3 to +6 after rounds 2-3), but the default loop's delivered student
# was not: typical's fell 2.4 points at 500 calls and 0.7 at 1,000 (3 seeds each), and its lead over random
# at 500 calls went from +5.8 to -0.2 (BENCHMARKS.md, "Earlier rounds hand over their final epoch").


@dataclass
class LoopConfig:
    images: str
    teacher: str
    budget: int
    rounds: int
    select: str = DEFAULT_SELECT
    out: str = "runs/loop"
    db: str | None = None
    endpoint: str | None = None
    top_k: int | None = None
    val: str | None = None  # a labelled folder to evaluate each round's student on
    seed: int = 0
    # Rounds after the first start from the previous round's model.pt (every layer at --lr: the whole
    # network is the loop's own) instead of from the init the train flags give round 1. None (auto):
    # warm when round 1's student started from random init. Measured there (Imagenette, 1,000 calls in
    # 4 rounds of 30 epochs, 3 seeds): +6.9 points for random, +6.2 for typical, since each round then
    # builds on the training of the ones before. A student that started from ImageNet weights is not
    # measured warm (its backbone would lose --backbone-lr's care), so it stays cold.
    warm_start: bool | None = None
    unlabeled: str = "auto"  # the last round's --unlabeled; earlier rounds train on their answers alone
    train: dict = field(default_factory=dict)  # TrainConfig fields: width, image_size, epochs, label_map, ...


def round_targets(budget: int, rounds: int) -> list[int]:
    """Answered images wanted after each round: the budget in equal parts, the last one exact."""
    return [budget * r // rounds for r in range(1, rounds + 1)]


def run_loop(cfg: LoopConfig, log: Callable[[str], None] = print) -> dict:
    """Harvest and train round after round; returns one summary per round."""
    from students.pretrained import RANDOM

    from .deploy.evaluate import evaluate
    from .harvest.engine import HarvestConfig, harvest
    from .training.trainer import TrainConfig, resumable, train

    if cfg.budget < 1 or cfg.rounds < 1 or cfg.rounds > cfg.budget:
        raise DistillError(f"--budget ({cfg.budget}) and --rounds ({cfg.rounds}) must be positive, "
                           "with at least one call per round")
    out = Path(cfg.out)
    base = HarvestConfig(images=cfg.images, teacher=cfg.teacher, endpoint=cfg.endpoint, db=cfg.db,
                         top_k=cfg.top_k, seed=cfg.seed)
    rounds, selector = [], None
    for r, target in enumerate(round_targets(cfg.budget, cfg.rounds), 1):
        run = out / f"round-{r}"
        if (run / ROUND_FILE).exists():  # finished on an earlier run: read back, nothing paid or trained
            row = {**json.loads((run / ROUND_FILE).read_text(encoding="utf-8")), "sent": 0}
        else:
            have = harvest(replace(base, dry_run=True))["already_cached"]
            strategy = cfg.select if selector else FIRST_ROUND.get(cfg.select, "random")
            sent = answered = 0
            if target > have:
                h = harvest(replace(base, max_calls=target - have, select=strategy,
                                    selector=selector if strategy in MODEL_BASED and selector else None))
                sent, answered = h["sent"], h["succeeded"]
            # Rounds before the last train on their answers alone: the rest of the pool is what the next
            # round chooses from, and Noisy Student on it would double the training of a student that only
            # has to select. The last round's student is the one delivered: it gets --unlabeled (default
            # auto: Noisy Student on the photos no call reached, as train does).
            flags = {**cfg.train, "unlabeled": cfg.unlabeled if r == cfg.rounds else "off"}
            # auto: a round 1 read back from an older loop's round.json has no "weights": cold, as it was.
            warm = bool(selector) and (cfg.warm_start if cfg.warm_start is not None
                                       else rounds[0].get("weights") == RANDOM.source)
            if warm:
                flags.update(init=str(Path(selector) / "model.pt"), backbone_lr=1.0, pretrained="off")
            t = train(TrainConfig(images=cfg.images, db=cfg.db, teachers=[cfg.teacher], out=str(run),
                                  resume=resumable(run), seed=cfg.seed, **flags))
            row = {"round": r, "strategy": strategy, "answered": have + answered, "sent": sent, "out": str(run),
                   "weights": t["weights"], "warm": warm,  # where its training started: "random", or an init file
                   "unlabeled_used": t["unlabeled_used"], "val_accuracy": t["val_accuracy"], "agreement": t["agreement"]}
            if cfg.val:
                e = evaluate(str(run), cfg.val, db_path=cfg.db, teacher_spec=cfg.teacher, latency=False)
                row.update(eval_accuracy=e["accuracy"], eval_agreement=e["teacher"]["agreement"])
            _write_row(run / ROUND_FILE, row)
        log(_line(row))
        rounds.append(row)
        selector = str(run)
    shutil.copy2(out / f"round-{cfg.rounds}" / "model.pt", out / "model.pt")  # the final student: --student OUT
    return {"out": str(out), "rounds": rounds}


def _write_row(path: Path, row: dict) -> None:
    """Atomically: a loop killed while writing it reruns the round's (finished) steps, no more."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _line(row: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    text = f"round {row['round']}  {row['strategy']}  sent {row['sent']}  answered {row['answered']}  "
    if row.get("warm"):
        text += "warm-started  "
    if row.get("unlabeled_used"):
        text += f"pseudo-labelled {row['unlabeled_used']}  "
    text += f"val accuracy {pct(row['val_accuracy'])}  agreement {pct(row['agreement'])}"
    if "eval_accuracy" in row:
        text += f"  eval accuracy {pct(row['eval_accuracy'])}  eval agreement {pct(row['eval_agreement'])}"
    return text
