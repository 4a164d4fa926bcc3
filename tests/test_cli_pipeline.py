"""The CLI end to end on a tiny real set: harvest -> train -> eval -> cache, with --resume."""

import json

from typer.testing import CliRunner

from distill_app.cli import app


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pipeline(photos):
    (photos / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    run = CliRunner()
    h = last_json(run.invoke(app, ["harvest", "--images", str(photos), "--db", "p.db", "--json"]))
    assert h["succeeded"] == 8 and h["skipped_files"] == 1

    args = ["train", "--images", str(photos), "--db", "p.db", "--width", "0.35", "--image-size", "32",
            "--batch-size", "4", "--out", "run", "--json"]
    t = last_json(run.invoke(app, args + ["--epochs", "1", "--max-classes", "5"]))
    assert t["epochs"] == 1 and t["skipped"] == 1

    again = run.invoke(app, args + ["--epochs", "2"])
    assert again.exit_code == 1 and "--resume" in again.output  # an existing run is never overwritten
    resumed = last_json(run.invoke(app, args + ["--epochs", "2", "--resume"]))
    assert resumed["epochs"] == 2
    assert len((photos.parent / "run" / "metrics.jsonl").read_text().splitlines()) == 2

    e = last_json(run.invoke(app, ["eval", "--student", "run", "--images", str(photos), "--db", "p.db",
                                   "--report", "rep", "--json"]))
    assert e["images"]["evaluated"] == 8
    assert e["teacher"]["answered"] == 8 and 0 <= e["teacher"]["agreement"] <= 1
    assert e["latency"]["ms_per_image_batch1"] > 0
    assert (photos.parent / "rep" / "report.md").exists()

    s = last_json(run.invoke(app, ["cache", "stats", "--db", "p.db", "--json"]))
    assert s["images"] == 8 and s["teachers"][0]["ok"] == 8
    exported = run.invoke(app, ["cache", "export", "--db", "p.db"])
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(rows) == 8 and all(r["scores"] for r in rows)


def test_train_without_answers_says_what_to_do(photos):
    res = CliRunner().invoke(app, ["train", "--images", str(photos), "--db", "empty.db"])
    assert res.exit_code == 1
    assert "distill harvest" in res.output
