"""distill labels suggest: a draft label map from class folders and stored answers; train with it,
or with --label-map folders directly; and the hint when folder names match no teacher label."""

import json
import tomllib

from typer.testing import CliRunner

from cache import ImageRow, Response, open_store
from distill_app.cli import app
from distill_app.data.images import sha256_bytes

ANSWERS = {  # what an ImageNet teacher might say about the crops in each folder
    "cat": [("tabby, tabby cat", 0.6), ("Egyptian cat", 0.3), ("espresso", 0.02), ("lynx", 0.08)],
    "coffee": [("espresso", 0.7), ("cup", 0.2), ("Egyptian cat", 0.06), ("lynx", 0.04)],
}
TEACHER = "local:efficientnet_lite0"


def _store(photos, db):
    files = sorted(photos.rglob("*.jpg"))
    store = open_store(str(db))
    store.add_images(ImageRow(sha256_bytes(f.read_bytes()), str(f), 64, 64, f.stat().st_size, f.parent.name)
                     for f in files)
    t = store.teacher_id(TEACHER, "distribution")
    store.record(t, [Response(sha256_bytes(f.read_bytes()), ANSWERS[f.parent.name]) for f in files])
    store.close()


def test_suggest_proposes_the_labels_that_carry_each_folder(photos, tmp_path):
    db = tmp_path / "d.db"
    _store(photos, db)
    res = CliRunner().invoke(app, ["labels", "suggest", "--images", str(photos), "--db", str(db),
                                   "--out", str(tmp_path / "map.toml")])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "map.toml").read_text()
    drafted = tomllib.loads(text)
    # Shares of each folder's mass: cat 60/30/8 (espresso 2% is under --min-share 5%), coffee 70/20.
    assert drafted == {"cat": ["tabby, tabby cat", "Egyptian cat", "lynx"], "coffee": ["espresso", "cup"]}
    assert '"tabby, tabby cat",  # 60.0%' in text
    # "Egyptian cat" passes in both folders: kept where it weighs most, flagged in the other.
    assert "also \"Egyptian cat\" (6.0%), kept in cat" in text and "feeds coffee" in res.output

    res = CliRunner().invoke(app, ["train", "--images", str(photos), "--db", str(db), "--label-map",
                                   str(tmp_path / "map.toml"), "--width", "0.35", "--image-size", "32",
                                   "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["classes"] == 2


def test_label_map_folders_trains_on_the_folder_classes(photos, tmp_path, caplog):
    db = tmp_path / "d.db"
    _store(photos, db)
    args = ["train", "--images", str(photos), "--db", str(db), "--width", "0.35", "--image-size", "32",
            "--epochs", "1", "--batch-size", "4", "--json"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "vocab")])
    assert res.exit_code == 0, res.output
    hints = [r.getMessage() for r in caplog.records if "labels suggest" in r.getMessage()]
    assert len(hints) == 1 and "match none of the teacher's" in hints[0] and "--label-map folders" in hints[0]
    res = CliRunner().invoke(app, [*args, "--label-map", "folders", "--out", str(tmp_path / "folders")])
    assert res.exit_code == 0, res.output
    from distill_app.training.checkpoint import open_student

    meta = open_student(tmp_path / "folders")[1]
    assert meta.classes == ["cat", "coffee"]
    assert meta.label_map == {"cat": ["tabby, tabby cat", "Egyptian cat", "lynx"], "coffee": ["espresso", "cup"]}
