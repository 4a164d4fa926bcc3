"""The model-driven --select strategies, through real parts: a real store, a real (tiny, saved)
student as --selector, the local EfficientNet-Lite0 teacher's features for diversity without
one, the on-disk score cache, and the selections each harvest records."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from cache import open_store
from conftest import decisive_student, save_test_student, write_photos
from distill_app.cli import app
from distill_app.data.images import decode_rgb, sha256_bytes
from distill_app.data.pixels import cache_dir, resize_center_crop
from distill_app.harvest.engine import HarvestConfig, harvest
from distill_app.harvest.scoring import Scorer
from distill_app.harvest.select import Pool, k_center_greedy, select, typical_picks
from distill_app.demo import sample_photo_paths
from distill_app.training.checkpoint import open_student

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: deprecated, supported


def _square(cls: str, size: int = 64) -> Image.Image:
    with Image.open(sample_photo_paths()[cls]) as photo:
        photo = photo.convert("RGB")
        side = min(photo.size)
        return photo.crop((0, 0, side, side)).resize((size, size), Image.BICUBIC)


@pytest.fixture
def near_copies(tmp_path) -> Path:
    """3 distinct photos (cat, coffee, rocket) and 3 near-copies of the cat: brighter, shifted by a
    pixel, saved at another JPEG quality. No class folders: diversity must find the groups alone."""
    root = tmp_path / "near"
    root.mkdir()
    cat = _square("cat")
    for cls in ("cat", "coffee", "rocket"):
        (cat if cls == "cat" else _square(cls)).save(root / f"{cls}.jpg", quality=90)
    ImageEnhance.Brightness(cat).enhance(1.03).save(root / "cat-brighter.jpg", quality=90)
    cat.transform(cat.size, Image.AFFINE, (1, 0, 1, 0, 1, 0)).save(root / "cat-shifted.jpg", quality=90)
    cat.save(root / "cat-q70.jpg", quality=70)
    return root


def _shas(root: Path) -> dict[str, str]:
    """file stem -> sha256 of its bytes."""
    return {p.stem: sha256_bytes(p.read_bytes()) for p in sorted(root.glob("*.jpg"))}


@pytest.fixture
def student(tmp_path) -> Path:
    """A saved MobileNetV2 x0.35 at 32 px whose predictions differ between the photos."""
    return save_test_student(tmp_path / "run" / "model.pt", decisive_student(3, head_std=0.1), ["a", "b", "c"])


@pytest.fixture
def photos8(tmp_path) -> Path:
    """8 distinct crops, 2 of each of 4 photos: entropies under the student 0.01 apart or more."""
    return write_photos(tmp_path / "photos8", classes=("cat", "coffee", "rocket", "motorbike"), per_class=2, size=48)


def _entropies(student: Path, files: dict[str, Path]) -> dict[str, float]:
    """Each photo's predictive entropy, computed here the plain way: decode, shorter side to the
    input size and centre crop, (x / 255 - mean) / std, one image at a time, -sum p log p."""
    model, meta = open_student(student)
    mean, std = np.array(meta.student.mean), np.array(meta.student.std)
    out = {}
    for name, path in files.items():
        pixels = resize_center_crop(decode_rgb(path.read_bytes()), meta.image_size) / 255.0
        x = torch.tensor(((pixels - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
        with torch.no_grad():
            p = torch.softmax(model(x), dim=1)[0].double().numpy()
        out[name] = float(-(p * np.log(p)).sum())
    return out


def _harvest(images: Path, db: Path, teacher: str, *flags: str):
    res = CliRunner().invoke(app, ["harvest", "--images", str(images), "--teacher", teacher, "--db", str(db),
                                   "--device", "cpu", "--json", *flags])
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("strategy", ["diversity", "typical"])
def test_diversity_and_typical_on_the_teacher_features_skip_near_copies(near_copies, teacher_spec, tmp_path, strategy):
    shas = _shas(near_copies)
    group = {shas[n] for n in ("cat", "cat-brighter", "cat-shifted", "cat-q70")}
    db = tmp_path / "d.db"
    _harvest(near_copies, db, teacher_spec, "--select", strategy, "--max-calls", "3")
    store = open_store(str(db), create=False)
    teacher = store.teachers()[0]["id"]
    answered = store.answered(teacher)
    assert len(answered) == 3 and len(answered & group) == 1  # one cat, the coffee and the rocket
    assert {shas["coffee"], shas["rocket"]} <= answered
    rows = store.selections(teacher)
    assert [(r["strategy"], r["round"], r["rank"], r["selector"]) for r in rows] == \
        [(strategy, 1, 1, None), (strategy, 1, 2, None), (strategy, 1, 3, None)]
    store.close()


def test_answered_images_are_centres_already(near_copies):
    """With a cat answered, a budget of 2 goes to the coffee and the rocket, not to cat copies."""
    shas = _shas(near_copies)
    paths = {sha: str(near_copies / f"{stem}.jpg") for stem, sha in shas.items()}
    waiting = [sha for stem, sha in shas.items() if stem != "cat"]
    pool = Pool(paths, budget=2, answered=[shas["cat"]], device="cpu")
    order = select("diversity", waiting, {}, seed=5, pool=pool)
    assert set(order[:2]) == {shas["coffee"], shas["rocket"]} and sorted(order) == sorted(waiting)
    assert pool.report["scored"] == 6 and pool.report["model"] == "teacher local:efficientnet_lite0"


def test_uncertainty_sends_the_least_sure_first_and_rounds_count_up(photos8, student, teacher_spec, tmp_path):
    files = {p.stem: p for p in sorted(photos8.rglob("*.jpg"))}
    shas = {name: sha256_bytes(path.read_bytes()) for name, path in files.items()}
    entropy = {shas[name]: h for name, h in _entropies(student, files).items()}
    expected = sorted(entropy, key=entropy.get, reverse=True)
    gaps = [entropy[a] - entropy[b] for a, b in zip(expected, expected[1:])]
    assert min(gaps) > 1e-3  # the order is a measured one, not float noise

    paths = {sha: str(files[name]) for name, sha in shas.items()}
    order = select("uncertainty", list(shas.values()), {}, pool=Pool(paths, 2, selector=str(student), device="cpu"))
    assert order == expected

    db = tmp_path / "u.db"
    _harvest(photos8, db, teacher_spec, "--select", "uncertainty", "--selector", str(student.parent),
             "--max-calls", "2")
    _harvest(photos8, db, teacher_spec, "--select", "uncertainty", "--selector", str(student.parent),
             "--max-calls", "3", "--seed", "4")
    store = open_store(str(db), create=False)
    rows = store.selections()
    assert [(r["image"], r["round"], r["rank"], r["seed"]) for r in rows] == \
        [(sha, 1, i, 0) for i, sha in enumerate(expected[:2], 1)] + \
        [(sha, 2, i, 4) for i, sha in enumerate(expected[2:5], 1)]  # the second run: what the first left
    assert {r["strategy"] for r in rows} == {"uncertainty"}
    assert {r["selector"] for r in rows} == {str(student.parent.resolve())}
    assert store.selections(round_=2) == rows[2:] and store.last_selection_round(rows[0]["teacher"]) == 2
    store.close()


def test_hybrid_takes_uncertain_images_but_not_two_copies(near_copies, student):
    shas = _shas(near_copies)
    paths = {sha: str(near_copies / f"{stem}.jpg") for stem, sha in shas.items()}
    pool = Pool(paths, 2, selector=str(student), device="cpu")
    by_uncertainty = select("uncertainty", list(shas.values()), {}, pool=pool)
    order = select("hybrid", list(shas.values()), {}, pool=pool)
    assert sorted(order) == sorted(shas.values())
    assert order[0] == by_uncertainty[0]  # no centres yet: the greedy starts from the most uncertain
    assert set(order[:2]) <= set(by_uncertainty[:4])  # picks come from the 2 x budget most uncertain


def test_k_center_greedy_spreads_and_counts_given_centres():
    points = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    assert k_center_greedy(points, 3) == [0, 3, 2]  # the near-copy of row 0 waits
    centre = torch.tensor([[-1.0, 0.0]])
    assert k_center_greedy(points, 2, centre) == [0, 2]
    assert sorted(k_center_greedy(points, 10)) == [0, 1, 2, 3]  # never a row twice


CENTRES = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def _blobs(seed: int = 0) -> torch.Tensor:
    """3 blobs of 30 points (2-d, sd 0.3) at distances of 10, rows 0-89, and 3 lone outliers far
    from all, rows 90-92."""
    g = torch.Generator().manual_seed(seed)
    blobs = [c + 0.3 * torch.randn(30, 2, generator=g) for c in CENTRES]
    return torch.cat(blobs + [torch.tensor([[30.0, 30.0], [-30.0, 20.0], [25.0, -30.0]])])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_typical_takes_one_dense_core_per_cluster_and_no_outlier(seed):
    points = _blobs(seed)
    picks = typical_picks(points, 3, seed=seed)
    assert sorted(i // 30 for i in picks) == [0, 1, 2]  # one per blob: no outlier (row 90+), no blob twice
    for i in picks:  # from the dense middle: within one sd of the blob's centre
        assert (points[i] - CENTRES[i // 30]).norm() < 0.3


def test_typical_counts_the_answered_images_and_never_picks_twice():
    points = _blobs(1)
    answered, waiting = points[:30], points[30:]  # blob 0 answered already
    picks = typical_picks(waiting, 2, answered)
    assert sorted(i // 30 for i in picks) == [0, 1]  # blobs 1 and 2 (rows 0-59 of waiting), not blob 0 again
    everything = typical_picks(waiting, 100, answered)
    assert sorted(everything) == list(range(len(waiting)))  # all of them, once each, when k >= N


def test_scores_are_cached_per_model(near_copies, student):
    shas = _shas(near_copies)
    paths = {sha: str(near_copies / f"{stem}.jpg") for stem, sha in shas.items()}
    first = Scorer(str(student), device="cpu").score(list(shas.values()), paths)
    assert first.computed == 6 and first.embeddings.shape[0] == 6
    assert torch.allclose(first.embeddings.norm(dim=1), torch.ones(6), atol=1e-2)
    files = sorted((cache_dir()).glob("scores-*/*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    again = Scorer(str(student), device="cpu").score(list(shas.values())[::-1], paths)  # a fresh process would
    assert again.computed == 0 and again.shas == list(shas.values())[::-1]
    assert torch.equal(again.entropy.flip(0), first.entropy)
    assert sorted(cache_dir().glob("scores-*/*.npz")) == files and files[0].stat().st_mtime_ns == stamp

    # Another model (other weights) is another cache; an unreadable file is skipped, not cached.
    other = save_test_student(student.parent.parent / "other" / "model.pt", decisive_student(3, head_std=0.3),
                              ["a", "b", "c"])
    (near_copies / "cat.jpg").write_bytes(b"not a jpeg any more")
    third = Scorer(str(other), device="cpu").score(list(shas.values()), paths)
    assert third.computed == 5 and third.failed == [shas["cat"]]
    assert len(list(cache_dir().glob("scores-*"))) == 2


def test_selector_errors_are_one_line(near_copies, tmp_path):
    runner = CliRunner()
    base = ["harvest", "--images", str(near_copies), "--db", str(tmp_path / "e.db")]
    for flags, message in [
        (["--select", "uncertainty"], "--select uncertainty needs --selector RUN"),
        (["--select", "hybrid"], "--select hybrid needs --selector RUN"),
        (["--select", "random", "--selector", "runs/x"], "--selector is used by --select uncertainty"),
        (["--select", "diversity", "--selector", "no-such-run"], "no such run folder or model file"),
        (["--select", "nearest"], "--select must be one of random, balanced, uncertainty, diversity, typical, hybrid"),
    ]:
        res = runner.invoke(app, base + flags)
        assert res.exit_code == 1 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "e.db").exists()  # refused before the scan


def test_a_budget_that_covers_the_wait_runs_no_model(near_copies, tmp_path):
    s = harvest(HarvestConfig(images=str(near_copies), db=str(tmp_path / "a.db"), select="diversity",
                              max_calls=10, dry_run=True))
    assert s["to_send"] == 6 and "model" not in s["selection"]
    assert not cache_dir().exists() or not list(cache_dir().glob("scores-*"))
    assert math.isclose(s["estimated_cost_usd"], 0.0)
