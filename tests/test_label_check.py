"""`cache labels --label-map`: what a map covers over the cached answers."""

import json

from typer.testing import CliRunner

from cache import ImageRow, Response, open_store
from distill_app.cli import app
from distill_app.data.label_check import check_label_map
from distill_app.data.targets import LabelMap

ANSWERS = {
    "a" * 64: [("tabby cat", 0.6), ("tiger cat", 0.3), ("dog", 0.1)],
    "b" * 64: [("espresso", 0.5), ("cup", 0.2), ("tabby cat", 0.1)],
    "c" * 64: [("monastery", 0.9)],
}
MAP = LabelMap(["cat", "coffee", "bird"], [["re:.*cat"], ["espresso", "CUP"], ["robin"]])


def test_coverage_per_class_and_outside():
    r = check_label_map(ANSWERS, MAP)
    by = {c["class"]: c for c in r["classes"]}
    assert by["cat"]["top1"] == 1 and abs(by["cat"]["mass"] - 1.0) < 1e-9
    assert {x["label"] for x in by["coffee"]["labels"]} == {"espresso", "cup"}  # case-insensitive
    assert r["empty_classes"] == ["bird"]
    assert [u["label"] for u in r["unmapped"]] == ["monastery", "dog"]
    assert r["mapped_top1_share"] == round(2 / 3, 4)
    assert abs(r["mapped_mass_share"] - 1.7 / 2.7) < 1e-3


def test_cli(tmp_path):
    store = open_store("l.db")
    store.add_images([ImageRow(sha, f"{i}.jpg", 1, 1, 1, None) for i, sha in enumerate(ANSWERS)])
    t = store.teacher_id("local:efficientnet_lite0", "distribution")
    store.record(t, [Response(sha, scores) for sha, scores in ANSWERS.items()])
    store.close()
    (tmp_path / "map.json").write_text(json.dumps({"cat": ["re:.*cat"], "coffee": ["espresso"]}))
    res = CliRunner().invoke(app, ["cache", "labels", "--db", "l.db", "--label-map", "map.json", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["answers"] == 3 and "monastery" in res.output
    res = CliRunner().invoke(app, ["cache", "labels", "--db", "l.db", "--teacher", "hf:x/y"])
    assert res.exit_code == 1 and "distill harvest --teacher hf:x/y" in res.output
