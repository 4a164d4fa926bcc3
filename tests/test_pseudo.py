"""``train --pseudo-labels RUN`` (Noisy Student): a trained student labels the images no call
reached, they train beside the answered ones, never in validation; resume repeats the run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from distill_app.errors import DistillError
from distill_app.training.data import prepare_data
from distill_app.training.pseudo import PSEUDO_FILE, predict
from distill_app.training.trainer import train
from test_train import _stop_after, config, make_dataset, store_answers, workspace  # noqa: F401  (fixtures)


@pytest.fixture
def labelled(tmp_path):  # tmp_path is the autouse workspace (test_train), the current folder
    """24 photos, 16 answered, and a student trained on those 16: the labeller."""
    rows = make_dataset(tmp_path / "photos")
    store_answers(tmp_path / "distill.db", rows[::3] + rows[1::3])
    train(config(tmp_path, epochs=1, out="labeller"))
    return tmp_path, {sha for sha, *_ in rows[2::3]}


def test_pseudo_labelled_images_train_but_never_validate(labelled):
    root, waiting = labelled
    summary = train(config(root, epochs=1, pseudo_labels="labeller", out="noisy"))
    supervised = json.loads((root / "labeller/config.json").read_text())
    assert summary["pseudo_labelled"] == len(waiting) == 8 and summary["unlabeled_used"] == 0
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


def test_pseudo_labels_with_unlabeled_auto_is_refused(labelled):
    root, _ = labelled
    with pytest.raises(DistillError, match="choose one"):
        train(config(root, pseudo_labels="labeller", unlabeled="auto", out="both"))
