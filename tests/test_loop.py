"""`distill loop` through the CLI with the real local teacher and real training: the budget spent
in rounds, and a rerun (or a loop killed mid-round) paying for nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cache import open_store
from conftest import write_photos
from distill_app.cli import app
from distill_app.loop import round_targets

LOOP = ["loop", "--teacher", "local", "--budget", "6", "--rounds", "2", "--select", "uncertainty",
        "--label-map", "folders", "--width", "0.35", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
        "--out", "runs/loop", "--json"]


def calls(db: str) -> int:
    store = open_store(db, create=False)
    try:
        return sum(r["calls"] for r in store.db["usage"].rows)
    finally:
        store.close()


def test_round_targets_split_the_budget_exactly():
    assert round_targets(10, 3) == [3, 6, 10]
    assert round_targets(6, 2) == [3, 6]


def test_loop_spends_the_budget_in_rounds_and_a_rerun_pays_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos", per_class=5)  # 10 photos, a budget of 6
    result = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rounds = summary["rounds"]
    assert [r["strategy"] for r in rounds] == ["random", "uncertainty"]
    assert [r["sent"] for r in rounds] == [3, 3] and rounds[-1]["answered"] == 6
    assert "round 2  uncertainty  sent 3" in result.output
    assert (tmp_path / "runs/loop/model.pt").exists() and (tmp_path / "runs/loop/round-2/model.pt").exists()
    assert calls("distill.db") == 6
    # Only the last round's student, the one delivered, learns from the 4 photos no call reached.
    assert [r["unlabeled_used"] for r in rounds] == [0, 4] and "pseudo-labelled 4" in result.output
    assert not (tmp_path / "runs/loop/round-1/labeller").exists()
    assert (tmp_path / "runs/loop/round-2/labeller/model.pt").exists()
    store = open_store("distill.db", create=False)
    try:
        chosen = list(store.db["selections"].rows)
    finally:
        store.close()
    assert sorted({(r["round"], r["strategy"]) for r in chosen}) == [(1, "random"), (2, "uncertainty")]
    again = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout.strip().splitlines()[-1])["rounds"]
    assert [r["sent"] for r in rerun] == [0, 0]
    # Finished rounds are read back: each row still says what that round trained on.
    assert [r["answered"] for r in rerun] == [3, 6]
    assert [r["val_accuracy"] for r in rerun] == [r["val_accuracy"] for r in rounds]
    assert calls("distill.db") == 6


def test_a_loop_killed_in_round_2_resumes_without_paying_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos", per_class=5)
    import distill_app.training.trainer as trainer

    real_train = trainer.train
    trained = []

    def killed_in_round_2(cfg, progress=None):
        trained.append(cfg.out)
        if cfg.out.endswith("round-2"):
            raise KeyboardInterrupt  # killed after round 2's harvest, before its training ended
        return real_train(cfg, progress)

    monkeypatch.setattr(trainer, "train", killed_in_round_2)
    killed = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert killed.exit_code != 0 and trained[-1].endswith("round-2")
    assert calls("distill.db") == 6
    trained.clear()
    monkeypatch.setattr(trainer, "train", lambda cfg, progress=None: trained.append(cfg.out) or real_train(cfg, progress))
    result = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout.strip().splitlines()[-1])["rounds"]
    assert [r["sent"] for r in rounds] == [0, 0] and [r["answered"] for r in rounds] == [3, 6]
    assert [Path(t).name for t in trained] == ["round-2"]  # round 1 was read back, not trained (or resumed) again
    assert calls("distill.db") == 6


def test_a_loop_killed_between_the_last_rounds_labeller_and_student_resumes(tmp_path, monkeypatch):
    """The last round's run folder then holds only its labeller's checkpoint: the rerun resumes it
    (reads the labeller back) instead of refusing a folder that "already holds a run"."""
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos", per_class=5)
    import distill_app.training.trainer as trainer

    real_label = trainer.add_pseudo_labels

    def killed_before_the_student(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "add_pseudo_labels", killed_before_the_student)
    killed = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert killed.exit_code != 0
    assert (tmp_path / "runs/loop/round-2/labeller/last.pt").exists()
    assert not (tmp_path / "runs/loop/round-2/last.pt").exists()
    monkeypatch.setattr(trainer, "add_pseudo_labels", real_label)
    result = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout.strip().splitlines()[-1])["rounds"]
    assert [r["sent"] for r in rounds] == [0, 0] and rounds[-1]["unlabeled_used"] == 4
    assert calls("distill.db") == 6
    off = CliRunner().invoke(app, [*LOOP, "--images", "photos", "--out", "runs/off", "--unlabeled", "off"])
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout.strip().splitlines()[-1])["rounds"][-1]["unlabeled_used"] == 0
    assert not (tmp_path / "runs/off/round-2/labeller").exists() and calls("distill.db") == 6
    # Every supervised round keeps its best-on-validation epoch (SPEC, train's default), the earlier ones
    # too: handing over their final epoch was measured and reverted (loop.py).
    keep = lambda r: json.loads((tmp_path / f"runs/off/round-{r}/config.json").read_text())["keep"]  # noqa: E731
    assert (keep(1), keep(2)) == ("best", "best")


def test_warm_start_trains_each_later_round_from_the_previous_student(tmp_path, monkeypatch):
    """By default when round 1 started from random init (no ImageNet weights offline at width 0.35),
    and with --warm-start whatever round 1 started from; --cold-start trains every round from scratch."""
    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos", per_class=5)
    result = CliRunner().invoke(app, [*LOOP, "--images", "photos"])
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout.strip().splitlines()[-1])["rounds"]
    assert rounds[0]["weights"] == "random" and [r["warm"] for r in rounds] == [False, True]
    assert "round 2  uncertainty  sent 3  answered 6  warm-started" in result.output
    first = json.loads((tmp_path / "runs/loop/round-1/config.json").read_text())
    # Round 2 is the last: Noisy Student, whose labeller starts from round 1 and its student from the labeller.
    second = json.loads((tmp_path / "runs/loop/round-2/labeller/config.json").read_text())
    assert first["init"] is None
    assert second["init"] == str(Path("runs/loop/round-1/model.pt")) and second["backbone_lr"] == 1.0
    import torch

    ckpt = torch.load(tmp_path / "runs/loop/round-2/labeller/model.pt", map_location="cpu", weights_only=False)
    assert ckpt["weights"]["source"] == f"init:{second['init']}"
    student = json.loads((tmp_path / "runs/loop/round-2/config.json").read_text())
    assert student["init"] == str(Path("runs/loop/round-2/labeller/model.pt")) and student["backbone_lr"] == 1.0
    # Each round keeps train's default: best-on-validation for supervised round 1, the final epoch for
    # both runs of the last round's Noisy Student.
    assert (first["keep"], second["keep"], student["keep"]) == ("best", "last", "last")
    # This run also leaves out --select: the default is typical, round 1 included.
    default_select = [a for a in LOOP if a not in ("--select", "uncertainty")]
    cold = CliRunner().invoke(app, [*default_select, "--images", "photos", "--cold-start", "--out", "runs/cold"])
    assert cold.exit_code == 0, cold.output
    cold_rounds = json.loads(cold.stdout.strip().splitlines()[-1])["rounds"]
    assert [r["warm"] for r in cold_rounds] == [False, False]
    assert [r["strategy"] for r in cold_rounds] == ["typical", "typical"]
    assert json.loads((tmp_path / "runs/cold/round-2/labeller/config.json").read_text())["init"] is None
    # Round 1 from an init file stays cold by default; --warm-start makes it warm all the same.
    forced = CliRunner().invoke(app, [*LOOP, "--images", "photos", "--init", "runs/loop/round-1/model.pt",
                                      "--warm-start", "--out", "runs/warm"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout.strip().splitlines()[-1])["rounds"][0]["weights"].startswith("init:")
    assert json.loads((tmp_path / "runs/warm/round-2/labeller/config.json").read_text())["init"] == str(
        Path("runs/warm/round-1/model.pt"))


def test_hybrid_starts_typical_and_every_round_starts_from_init(tmp_path, monkeypatch):
    """Round 1 of hybrid buys typical photos (TypiClust on the local teacher's features), later
    rounds use the student; --init reaches every round's training (no --warm-start)."""
    import torch

    from students import create_student

    monkeypatch.chdir(tmp_path)
    write_photos(tmp_path / "photos", per_class=5)
    torch.manual_seed(1)
    torch.save({"state_dict": create_student("mobilenetv2", 1000, width=0.35).state_dict()}, tmp_path / "init.pt")
    flags = [*LOOP, "--images", "photos", "--init", "init.pt"]
    flags[flags.index("uncertainty")] = "hybrid"
    result = CliRunner().invoke(app, flags)
    assert result.exit_code == 0, result.output
    rounds = json.loads(result.stdout.strip().splitlines()[-1])["rounds"]
    assert [r["strategy"] for r in rounds] == ["typical", "hybrid"] and calls("distill.db") == 6
    for run in ("round-1", "round-2/labeller"):  # round 2, the last, is Noisy Student: its labeller starts from init
        assert json.loads((tmp_path / f"runs/loop/{run}/config.json").read_text())["init"] == "init.pt"
    bad = CliRunner().invoke(app, [*LOOP, "--images", "photos", "--pretrained", "maybe"])
    assert bad.exit_code == 2 and "choose one of auto, on, off" in bad.output  # a usage error, as for train
