"""``train --pseudo-labels RUN`` (Noisy Student): a trained student labels the images no call
reached, they train beside the answered ones, never in validation; resume repeats the run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_app.errors import DistillError
from distill_app.training.data import prepare_data
from distill_app.training.pseudo import LABELLER_DIR, PSEUDO_FILE, predict
from distill_app.training.trainer import train
from test_train import (_stop_after, config, make_dataset, part_answered, store_answers,  # noqa: F401  (fixtures)
                        workspace)


@pytest.fixture
def labelled(tmp_path):  # tmp_path is the autouse workspace (test_train), the current folder
    """24 photos, 16 answered, and a student trained on those 16: the labeller."""
    rows = make_dataset(tmp_path / "photos")
    store_answers(tmp_path / "distill.db", rows[::3] + rows[1::3])
    train(config(tmp_path, epochs=1, out="labeller", unlabeled="off"))
    return tmp_path, {sha for sha, *_ in rows[2::3]}


def test_pseudo_labelled_images_train_but_never_validate(labelled):
    root, waiting = labelled
    summary = train(config(root, epochs=1, pseudo_labels="labeller", out="noisy"))
    supervised = json.loads((root / "labeller/config.json").read_text())
    assert summary["pseudo_labelled"] == summary["unlabeled_used"] == len(waiting) == 8
    assert summary["unlabeled"] == "noisy" and "labeller" not in summary  # the labeller was given
    alone = prepare_data(config(root, out="x"), None)
    assert summary["images"]["val"] == int(alone.is_val.sum())  # validation: the teacher's answers only
    assert summary["images"]["train"] == int((~alone.is_val).sum()) + 8
    saved = np.load(root / "noisy" / PSEUDO_FILE)
    assert set(saved["shas"]) == waiting
    expected = predict("labeller", alone, "cpu")  # the labeller's softmax, in the order of alone.unlabeled
    order = [list(saved["shas"]).index(sha) for sha, _ in alone.unlabeled]
    assert np.allclose(saved["targets"][order], expected, atol=1e-5)
    assert np.allclose(saved["targets"].sum(axis=1), 1, atol=1e-4) and supervised["pseudo_labels"] is None


def test_resume_with_pseudo_labels_repeats_an_uninterrupted_run_without_the_labeller(labelled):
    root, _ = labelled
    flags = dict(pseudo_labels="labeller", epochs=2)
    train(config(root, out="straight", **flags))
    with pytest.raises(KeyboardInterrupt):
        train(config(root, out="resumed", **flags), progress=_stop_after(1))
    (root / "labeller/model.pt").rename(root / "labeller/gone.pt")  # resume reads the saved targets
    train(config(root, out="resumed", resume=True, **flags))
    straight = torch.load(root / "straight/last.pt", weights_only=True)
    resumed = torch.load(root / "resumed/last.pt", weights_only=True)
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float()), key


def test_a_labeller_with_other_classes_or_no_student_is_a_one_line_error(labelled):
    root, _ = labelled
    with pytest.raises(DistillError, match="no student at"):
        train(config(root, pseudo_labels="nowhere", out="a"))
    with pytest.raises(DistillError, match="predicts 4 classes .* trains on 5"):
        train(config(root, pseudo_labels="labeller", other=True, out="b"))


def test_pseudo_rows_merge_in_hash_order_with_their_own_path_and_target(tmp_path, monkeypatch):
    """Every per-row array moves with its hash: the merged data stays sorted, and each pseudo row
    carries its own path, the labeller's target and its argmax, in the training split."""
    from distill_app.training import pseudo
    from distill_app.training.data import TrainData

    eye = np.eye(3, dtype=np.float32)
    data = TrainData(shas=["b", "d"], paths=["pb", "pd"], soft_targets=eye[[0, 1]],
                     hard_labels=np.array([0, 1]), teacher_top1=np.array([0, 1]),
                     is_val=np.array([False, True]), classes=["x", "y", "z"], label_map=None,
                     unlabeled=[("e", "pe"), ("a", "pa"), ("c", "pc")])
    given = {"e": [0.1, 0.2, 0.7], "a": [0.6, 0.3, 0.1], "c": [0.2, 0.5, 0.3]}
    monkeypatch.setattr(pseudo, "predict", lambda labeller, d, device, batch: np.array(
        [given[sha] for sha, _ in d.unlabeled], np.float32))
    merged = pseudo.add_pseudo_labels(data, "labeller", tmp_path, resume=False)
    assert merged.shas == ["a", "b", "c", "d", "e"] and merged.unlabeled == []
    assert merged.paths == ["pa", "pb", "pc", "pd", "pe"]
    assert merged.is_val.tolist() == [False, False, False, True, False]
    for i, sha in enumerate(merged.shas):
        target = given.get(sha, eye[{"b": 0, "d": 1}.get(sha, 0)])
        assert np.allclose(merged.soft_targets[i], target), sha
        assert merged.hard_labels[i] == merged.teacher_top1[i] == int(np.argmax(target))
    assert merged.counts["pseudo_labelled"] == 3
    # Resume reads the saved targets back; a different set of waiting images is a new run.
    monkeypatch.setattr(pseudo, "predict", None)
    again = pseudo.add_pseudo_labels(data, "gone", tmp_path, resume=True)
    assert again.shas == merged.shas and np.array_equal(again.soft_targets, merged.soft_targets)
    for unlabeled in ([("e", "pe"), ("a", "pa")], []):
        with pytest.raises(DistillError, match="start a new run"):
            pseudo.add_pseudo_labels(replace(data, unlabeled=unlabeled), "gone", tmp_path, resume=True)


def test_pseudo_labels_with_fixmatch_or_off_is_refused(labelled):
    root, _ = labelled
    for unlabeled in ("fixmatch", "off"):
        with pytest.raises(DistillError, match="choose one"):
            train(config(root, pseudo_labels="labeller", unlabeled=unlabeled, out="both"))


# -- --unlabeled auto (the default): Noisy Student in one command ----------------------------------


class _StopAtEpochCall:
    """A progress callback that counts the finished epochs over both runs (the labeller's come first)
    and interrupts at the ``n``-th."""

    def __init__(self, n: int):
        self.n, self.seen = n, 0

    def __call__(self, epoch, step, steps, info):
        if info.get("phase") == "epoch":
            self.seen += 1
            if self.seen >= self.n:
                raise KeyboardInterrupt


def test_unlabeled_auto_trains_a_labeller_then_learns_its_labels_never_validating_on_them(part_answered):
    root, waiting = part_answered
    summary = train(config(root, epochs=1, out="run"))  # no --unlabeled: the default, auto
    assert summary["unlabeled"] == "noisy" and summary["unlabeled_used"] == summary["pseudo_labelled"] == 8
    assert summary["labeller"]["out"] == str(Path("run") / LABELLER_DIR) and summary["labeller"]["epochs"] == 1
    first = json.loads((root / "run" / LABELLER_DIR / "config.json").read_text())
    second = json.loads((root / "run/config.json").read_text())
    assert first["unlabeled"] == "off" and first["pseudo_labels"] is None  # the labeller: answers only
    assert (first["keep"], second["keep"]) == ("last", "last")  # --keep auto
    assert second["unlabeled"] == "noisy" and second["pseudo_labels"] == str(Path("run") / LABELLER_DIR)
    # the student goes on from its labeller (trainer.warm_start), the whole network at --lr
    assert second["init"] == str(Path("run") / LABELLER_DIR / "model.pt") and second["backbone_lr"] == 1.0
    assert summary["weights"] == "init:" + second["init"]
    alone = prepare_data(config(root, out="x"), None)
    assert summary["images"]["val"] == int(alone.is_val.sum())  # validation: the teacher's answers only
    assert summary["images"]["train"] == int((~alone.is_val).sum()) + len(waiting)
    saved = np.load(root / "run" / PSEUDO_FILE)
    assert set(saved["shas"]) == waiting  # the unanswered images, and only those
    expected = predict(str(root / "run" / LABELLER_DIR), alone, "cpu")
    order = [list(saved["shas"]).index(sha) for sha, _ in alone.unlabeled]
    assert np.allclose(saved["targets"][order], expected, atol=1e-5)
    lines = [json.loads(x) for x in (root / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["unlabeled_used"] for m in lines] == [8]


def test_predict_averages_the_labellers_softmax_over_the_image_and_its_mirror(part_answered, monkeypatch):
    root, _ = part_answered
    train(config(root, epochs=1, out="lab", unlabeled="off"))
    from distill_app.training import checkpoint

    _, meta = checkpoint.open_student("lab")

    class LeftAgainstRight(torch.nn.Module):  # mirroring the image swaps its logits' sign
        def forward(self, x):
            half = x.shape[3] // 2
            d = x[..., :half].mean(dim=(2, 3)) - x[..., -half:].mean(dim=(2, 3))  # (B, 3)
            return torch.cat([d, -d.sum(1, keepdim=True)], dim=1) * 50  # 4 classes, like the run's

    monkeypatch.setattr(checkpoint, "open_student", lambda path: (LeftAgainstRight(), meta))
    data = prepare_data(config(root, out="x"), None)
    from distill_app.data.pixels import load_pixels, to_input

    shas, paths = map(list, zip(*data.unlabeled))
    x = to_input(torch.from_numpy(np.array(load_pixels(shas, paths, meta.student.image_size))),
                 meta.student.mean, meta.student.std)
    plain, mirrored = (torch.softmax(LeftAgainstRight()(v), 1) for v in (x, x.flip(3)))
    got = torch.from_numpy(predict("lab", data, "cpu"))
    assert torch.allclose(got, (plain + mirrored) / 2, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the mirror really counts


def test_unlabeled_auto_with_few_unanswered_images_trains_once(workspace):
    rows = make_dataset(workspace / "photos")
    store_answers(workspace / "distill.db", rows[2:])  # 2 unanswered beside 22: under NOISY_MIN_SHARE
    summary = train(config(workspace, epochs=1, out="run"))
    assert summary["unlabeled"] == "off" and summary["unlabeled_used"] == 0 and summary["unanswered"] == 2
    assert "labeller" not in summary and not (workspace / "run" / LABELLER_DIR).exists()


def test_unlabeled_auto_killed_in_either_run_resumes_to_the_uninterrupted_result(part_answered):
    root, _ = part_answered
    train(config(root, out="straight", epochs=2))
    # Epoch calls 1-2 are the labeller's, 3-4 the student's; each case: (where it stops, epochs left).
    for out, stop, left in (("in-labeller", 1, 3), ("between", 2, 2), ("in-student", 3, 1)):
        with pytest.raises(KeyboardInterrupt):
            train(config(root, out=out, epochs=2), progress=_StopAtEpochCall(stop))
        with pytest.raises(DistillError, match="already holds a run"):
            train(config(root, out=out, epochs=2))  # without --resume: refused, nothing overwritten
        counted = _StopAtEpochCall(99)
        # --resume keeps the run's own flags (the labeller's and the student's) whatever is given now
        summary = train(config(root, out=out, epochs=2, lr=0.5, resume=True), progress=counted)
        assert counted.seen == left, out  # nothing trained twice
        assert summary["labeller"]["out"] == str(Path(out) / LABELLER_DIR) and summary["unlabeled_used"] == 8
        for run in (LABELLER_DIR, "."):
            straight = torch.load(root / "straight" / run / "last.pt", weights_only=True)
            resumed = torch.load(root / out / run / "last.pt", weights_only=True)
            for key, value in straight["model"].items():
                assert torch.allclose(value.float(), resumed["model"][key].float()), (out, run, key)
    with pytest.raises(DistillError, match="nothing to resume"):
        train(config(root, out="never", epochs=2, resume=True))


def test_configs_of_earlier_runs_resume_as_they_trained(tmp_path):
    from distill_app.training.config import TrainConfig, resumed_config

    given = TrainConfig(images="photos")
    fixmatch = resumed_config(given, {"config": {"images": "photos", "unlabeled": "auto"}}, tmp_path)
    noisy = resumed_config(given, {"config": {"images": "photos", "unlabeled": "off", "pseudo_labels": "lab"}},
                           tmp_path)
    assert fixmatch.unlabeled == "fixmatch"  # before noisy|fixmatch, auto was FixMatch
    assert (noisy.unlabeled, noisy.pseudo_labels) == ("noisy", "lab")
