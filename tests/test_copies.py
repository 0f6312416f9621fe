"""The copy finder: candidates from the embeddings, confirmed by the pixels (generated images with planted
copies), the embeddings-only fallback, copy groups, and leakage across a protocol's folds."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline import Protocol
from pipeline.copies import PIXEL_COPY, Images, copy_groups, find_copies, leaked, pixel_similarity
from pipeline.similarity import normalized

N = 12


def _picture(rng: np.random.Generator) -> Image.Image:
    """A 160 x 120 picture: a smooth random background with a few random shapes on it."""
    ground = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
    draw = ImageDraw.Draw(ground)
    for _ in range(6):
        x, y, w, h = rng.integers(0, 140), rng.integers(0, 100), rng.integers(10, 50), rng.integers(10, 50)
        draw.ellipse((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return ground


def _rotated(im: Image.Image) -> Image.Image:
    """Rotated 3 degrees, the corners filled with the median colour of the border."""
    a = np.asarray(im)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return im.rotate(3, Image.BICUBIC, fillcolor=tuple(int(v) for v in np.median(border, axis=0)))


# name -> how a copy of an original is saved
COPIES = {
    "jpeg q50": lambda im, p: im.save(p.with_suffix(".jpg"), quality=50),
    "resize 50%": lambda im, p: im.resize((80, 60)).save(p.with_suffix(".jpg"), quality=85),
    "crop 90%": lambda im, p: im.crop((8, 6, 152, 114)).save(p.with_suffix(".jpg"), quality=90),
    "png": lambda im, p: im.save(p.with_suffix(".png")),
    "rotate 3deg": lambda im, p: _rotated(im).save(p.with_suffix(".jpg"), quality=90),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """N originals, a copy of each of the first len(COPIES), and a twin of original 0 (the same ground,
    one shape moved): its embedding is the closest to original 0, yet it is another picture."""
    folder = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    where, originals = {}, []
    for n in range(N):
        im = _picture(rng)
        originals.append(im)
        where[f"o{n}"] = folder / f"o{n}.jpg"
        im.save(where[f"o{n}"], quality=95)
    for n, make in enumerate(COPIES.values()):
        make(originals[n], folder / f"c{n}")
        where[f"c{n}"] = next(folder.glob(f"c{n}.*"))
    twin = originals[0].copy()
    ImageDraw.Draw(twin).rectangle((100, 20, 140, 60), fill=(250, 30, 30))
    where["twin"] = folder / "twin.jpg"
    twin.save(where["twin"], quality=95)
    ids = np.array(list(where), dtype=object)
    # features: random, each copy at cosine ~0.7 to its original (as re-encoded copies fall on real
    # photos), the twin at ~0.95 to original 0 (as distinct but alike pictures rise)
    X = rng.normal(size=(len(ids), 32))
    for n in range(len(COPIES)):
        X[N + n] = X[n] + 0.9 * rng.normal(size=32)
    X[-1] = X[0] + 0.3 * rng.normal(size=32)
    return dict(ids=ids, X=normalized(X), images=Images(where), where=where)


def _pairs(copies, ids) -> set[tuple[str, str]]:
    c = copies.confirmed
    return {tuple(sorted((ids[i], ids[j]))) for i, j in zip(copies.i[c], copies.j[c])}


@pytest.mark.parametrize("kind", list(COPIES))
def test_each_kind_of_copy_passes_the_pixel_check(planted, kind):
    n = list(COPIES).index(kind)
    images = planted["images"]
    assert pixel_similarity(images.grey(f"o{n}"), images.grey(f"c{n}")) >= PIXEL_COPY
    assert pixel_similarity(images.grey(f"o{n}"), images.grey(f"o{n + 1}")) < 0.5  # another picture


def test_the_pixels_confirm_the_copies_and_refuse_the_twin(planted):
    ids = planted["ids"]
    copies = find_copies(planted["X"], ids, planted["images"])
    assert copies.by_pixels
    assert _pairs(copies, ids) == {(f"c{n}", f"o{n}") for n in range(len(COPIES))}
    twin = (copies.i == list(ids).index("o0")) & (copies.j == list(ids).index("twin"))
    assert copies.similarity[twin][0] > 0.9 and copies.pixel_similarity[twin][0] < PIXEL_COPY


def test_without_images_the_embeddings_decide_alone_and_say_so(planted):
    ids = planted["ids"]
    copies = find_copies(planted["X"], ids, None)
    assert not copies.by_pixels and "embeddings only" in copies.rule()
    assert not _pairs(copies, ids) & {(f"c{n}", f"o{n}") for n in range(len(COPIES))}  # copies at cosine 0.7 missed
    by_cosine = find_copies(planted["X"], ids, None, embedding_cosine=0.9)
    assert _pairs(by_cosine, ids) == {("o0", "twin")}  # the closest pair, a copy or not: why the pixels are asked
    moved = Images({sid: Path("/nowhere") / p.name for sid, p in planted["where"].items()})
    assert not find_copies(planted["X"], ids, moved).by_pixels
    changed = Images(planted["where"], hashes={sid: b"other bytes" for sid in ids})  # bytes changed since extraction
    assert not find_copies(planted["X"], ids, changed).by_pixels


def test_copy_groups_are_connected_components(planted):
    ids = planted["ids"]
    groups = copy_groups(find_copies(planted["X"], ids, planted["images"]), len(ids))
    assert groups[:N].tolist() == list(range(N))  # originals first, each its own group
    assert groups[N:N + len(COPIES)].tolist() == list(range(len(COPIES)))  # each copy in its original's
    assert groups[-1] == N  # the twin is not a copy: a group of its own


def test_leaked_counts_copies_across_folds_only(planted):
    ids = planted["ids"]
    y = np.array(["a", "b"] * (len(ids) // 2) + ["a"] * (len(ids) % 2), dtype=object)
    folds = np.full(len(ids), -1)
    folds[N:N + 3] = 0  # three copies scored, their originals trained on
    folds[3] = 0  # copy 3's original scored too: that pair lies within the fold
    folds[N + 3] = 0
    holdout = Protocol("t", "classification", "val", 0, ids, y, folds)
    rows, copies = leaked(planted["X"], ids, holdout, planted["images"])
    assert ids[rows].tolist() == ["c0", "c1", "c2"]
    assert all(folds[i] != folds[j] for i, j in zip(copies.i, copies.j))  # only pairs across folds looked at
