"""From stored answers to training targets: label maps, the three score kinds, ensembles, hard labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill_app.errors import DistillError
from distill_app.data.targets import (LabelMap, build_targets, default_classes, ensemble, hard_labels,
                                 load_label_map, one_hot, with_other)

DOGS = 'tench = ["tench, Tinca tinca"]\ndog = ["re:.*(terrier|retriever).*", "Dog"]\n'


def rows(targets) -> list[list[float]]:
    return np.round(np.asarray(targets, dtype=np.float64), 6).tolist()


# -- label maps --------------------------------------------------------------------------------


def test_label_map_from_toml_and_json_keeps_class_order(tmp_path):
    toml = tmp_path / "map.toml"
    toml.write_text(DOGS)
    as_json = tmp_path / "map.json"
    as_json.write_text(json.dumps({"tench": ["tench, Tinca tinca"], "dog": ["re:.*(terrier|retriever).*", "Dog"]}))
    for path in (toml, as_json):
        m = load_label_map(path)
        assert m.classes == ["tench", "dog"]
        assert m.sources == [["tench, Tinca tinca"], ["re:.*(terrier|retriever).*", "Dog"]]
    assert LabelMap.from_dict(m.to_dict()) == m


def test_matching_exact_then_case_insensitive_then_regex(tmp_path):
    path = tmp_path / "map.toml"
    path.write_text('animal = ["re:.*"]\nbig = ["DOG"]\ndog = ["dog"]\n')
    m = load_label_map(path)
    assert m.index("dog") == 2  # exact beats the case-insensitive "DOG" listed earlier
    assert m.index("Dog") == 1  # no exact entry: first case-insensitive one
    assert m.index("cat") == 0  # only the regex
    regex = LabelMap(["dog"], [["re:.*terrier"]])
    assert regex.index("Boston terrier") == 0 and regex.index("terrier mix") == -1  # full match only


@pytest.mark.parametrize(("text", "suffix", "problem"), [
    ("dog = [", ".toml", "invalid TOML"),
    ("{", ".json", "invalid JSON"),
    ("[1, 2]", ".json", "expected a JSON object"),
    ('{"dog": ["a"], "dog": ["b"]}', ".json", "appears twice"),
    ("", ".toml", "found none"),
    ("dog = []", ".toml", "lists no teacher labels"),
    ("[dog]\nx = 1", ".toml", "got a table"),
    ("dog = [1]", ".toml", "non-empty strings"),
    ('dog = ["re:("]', ".toml", "bad regular expression"),
])
def test_bad_label_maps_are_one_line_errors_naming_the_file(tmp_path, text, suffix, problem):
    path = tmp_path / f"map{suffix}"
    path.write_text(text)
    with pytest.raises(DistillError, match=problem) as info:
        load_label_map(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_label_map(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_label_map(tmp_path / "nope.toml")


# -- class lists -------------------------------------------------------------------------------


def test_default_classes_by_total_mass_ties_by_name():
    answers = {"a": [("cat", 0.6), ("dog", 0.4)], "b": [("dog", 0.5), ("cat", 0.3), ("fox", 0.2)],
               "c": [("emu", 0.2), ("zebra", 0.0)]}
    assert default_classes(answers) == ["cat", "dog", "emu", "fox"]  # cat 0.9, dog 0.9: by name
    assert default_classes(answers, max_classes=2) == ["cat", "dog"]
    assert default_classes([answers, {"d": [("zebra", 1.0)]}])[:1] == ["zebra"]  # an ensemble: summed


def test_with_other_adds_a_column_unless_one_exists():
    assert with_other(["a", "b"], True) == ["a", "b", "other"]
    assert with_other(["a", "other"], True) == ["a", "other"]
    assert with_other(["a"], False) == ["a"]


# -- distribution and top-k --------------------------------------------------------------------


def test_distribution_sums_mapped_labels_and_renormalises():
    m = LabelMap(["dog", "cat"], [["re:.*terrier", "beagle"], ["tabby"]])
    answers = {"x": [("Boston terrier", 0.3), ("beagle", 0.2), ("tabby", 0.25), ("car", 0.25)]}
    shas, t = build_targets(answers, "distribution", m)
    assert shas == ["x"] and rows(t) == [[round(0.5 / 0.75, 6), round(0.25 / 0.75, 6)]]
    _, t = build_targets(answers, "distribution", m, other=True)
    assert rows(t) == [[0.5, 0.25, 0.25]]


def test_topk_missing_mass_goes_to_other_or_is_renormalised_away():
    answers = {"x": [("dog", 0.5), ("cat", 0.2)]}  # 0.3 of the distribution was not returned
    _, t = build_targets(answers, "topk", ["dog", "cat"], other=True)
    assert rows(t) == [[0.5, 0.2, 0.3]]
    _, t = build_targets(answers, "topk", ["dog", "cat"])
    assert rows(t) == [[round(5 / 7, 6), round(2 / 7, 6)]]


def test_a_class_named_other_receives_the_uncovered_mass():
    _, t = build_targets({"x": [("dog", 0.5), ("car", 0.1)]}, "topk", ["dog", "other"], other=True)
    assert rows(t) == [[0.5, 0.5]]


def test_multilabel_max_per_class_then_normalised():
    m = LabelMap(["dog", "cat"], [["Dog", "Terrier"], ["Cat"]])
    answers = {"x": [("Dog", 0.9), ("Terrier", 0.8), ("Cat", 0.3), ("Mammal", 0.95)]}
    _, t = build_targets(answers, "multilabel", m)
    assert rows(t) == [[round(0.9 / 1.2, 6), round(0.3 / 1.2, 6)]]
    _, t = build_targets(answers, "multilabel", m, other=True)  # other = 1 - max = 0.1
    assert rows(t) == [[round(0.9 / 1.3, 6), round(0.3 / 1.3, 6), round(0.1 / 1.3, 6)]]
    _, t = build_targets({"y": [("Mammal", 0.9)]}, "multilabel", m, other=True)
    assert rows(t) == [[0.0, 0.0, 1.0]]


def test_rows_with_nothing_mapped_or_empty_answers_are_dropped():
    answers = {"a": [("dog", 0.9)], "b": [("car", 1.0)], "c": [], "d": [("dog", 0.0)]}
    shas, t = build_targets(answers, "distribution", ["dog", "cat"])
    assert shas == ["a"] and t.shape == (1, 2)
    shas, t = build_targets(answers, "distribution", ["dog", "cat"], other=True)
    assert shas == ["a", "b", "d"]  # "b" is all "other"; "d" returned a label, all mass missing
    assert rows(t)[1] == [0.0, 0.0, 1.0]
    shas, t = build_targets({}, "topk", ["dog", "cat"])
    assert shas == [] and t.shape == (0, 2) and t.dtype == np.float32


def test_a_label_matching_two_classes_counts_once():
    m = LabelMap(["terriers", "dogs"], [["re:.*terrier"], ["re:.*terrier", "beagle"]])
    _, t = build_targets({"x": [("Boston terrier", 0.6), ("beagle", 0.2)]}, "topk", m, other=True)
    assert rows(t) == [[0.6, 0.2, 0.2]]


def test_scores_out_of_range_are_clipped_and_nan_ignored():
    answers = {"x": [("dog", 1.7), ("cat", -0.4), ("fox", float("nan"))], "y": [("fox", float("nan"))],
               "z": [("dog", float("inf")), ("cat", 0.5)]}
    shas, t = build_targets(answers, "distribution", ["dog", "cat", "fox"])
    assert shas == ["x", "z"]
    assert rows(t) == [[1.0, 0.0, 0.0], [round(1 / 1.5, 6), round(0.5 / 1.5, 6), 0.0]]


def test_ties_and_duplicate_labels_are_deterministic():
    _, t = build_targets({"x": [("dog", 0.4), ("cat", 0.4), ("dog", 0.1)]}, "topk", ["cat", "dog"])
    assert rows(t) == [[0.444444, 0.555556]]  # duplicates sum for distributions
    _, t = build_targets({"x": [("dog", 0.4), ("cat", 0.4)]}, "topk", ["cat", "dog"])
    assert hard_labels(t, ["cat", "dog"]).tolist() == [0]  # argmax ties go to the earlier class


# -- ensembles and hard labels -----------------------------------------------------------------


def test_ensemble_weights_renormalised_over_teachers_present():
    a = (["x", "y"], np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), 1.0)
    b = (["y", "z"], np.array([[1.0, 0.0], [0.5, 0.5]], np.float32), 3.0)
    shas, t = ensemble([a, b])
    assert shas == ["x", "y", "z"]
    assert rows(t) == [[1.0, 0.0], [0.75, 0.25], [0.5, 0.5]]
    with pytest.raises(ValueError, match="class counts"):
        ensemble([a, (["x"], np.ones((1, 3), np.float32) / 3, 1.0)])
    with pytest.raises(ValueError, match="positive"):
        ensemble([(*a[:2], 0.0)])


def test_hard_labels_prefer_folder_labels_that_name_a_class():
    t = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)
    assert hard_labels(t, ["cat", "dog"], ["Dog", None, "unicorn"]).tolist() == [1, 1, 0]
    assert one_hot(np.array([1, 0]), 3).tolist() == [[0, 1, 0], [1, 0, 0]]


# -- properties and speed ----------------------------------------------------------------------

LABELS = st.sampled_from(["dog", "Dog", "cat", "car", "Boston terrier", "x"])
SCORES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.just(0.0))
ANSWERS = st.dictionaries(st.text("0123456789abcdef", min_size=1, max_size=4),
                          st.lists(st.tuples(LABELS, SCORES), max_size=6), max_size=12)


@settings(max_examples=300, deadline=None)
@given(answers=ANSWERS, kind=st.sampled_from(["distribution", "topk", "multilabel"]), other=st.booleans())
def test_every_row_is_a_distribution_whatever_the_answers(answers, kind, other):
    m = LabelMap(["dog", "cat", "terrier"], [["dog"], ["CAT"], ["re:.*terrier"]])
    shas, t = build_targets(answers, kind, m, other=other)
    assert t.dtype == np.float32 and t.shape == (len(shas), 4 if other else 3)
    assert set(shas) <= set(answers) and len(set(shas)) == len(shas)
    assert np.isfinite(t).all() and (t >= 0).all()
    assert np.allclose(t.sum(axis=1), 1.0, atol=1e-5)
    assert all(not math.isnan(x) for x in t.flat)


def test_one_hundred_thousand_answers_in_seconds():
    import time

    rng = np.random.default_rng(0)
    vocab = [f"label {i}" for i in range(1000)]
    picks, scores = rng.integers(0, 1000, (100_000, 5)), rng.dirichlet(np.ones(6), 100_000)[:, :5]
    answers = {f"{i:064x}": list(zip([vocab[j] for j in p], s.tolist())) for i, (p, s) in enumerate(zip(picks, scores))}
    started = time.perf_counter()
    classes = default_classes(answers, max_classes=100)
    shas, t = build_targets(answers, "topk", classes, other=True)
    assert time.perf_counter() - started < 10 and len(shas) == 100_000 and t.shape == (100_000, 101)
