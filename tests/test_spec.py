"""The feature spec: one record of what determines a cache's features, with one key, written into the
cache and rebuilt by every stage that computes features again."""

from dataclasses import replace

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from pipeline import FeatureCache, FeatureSpec, extract
from pipeline.verify import verify


def test_every_field_is_part_of_the_key():
    spec = FeatureSpec("m", "ab" * 32, {"input_size": [3, 8, 8]})
    assert FeatureSpec.from_dict(spec.to_dict()) == spec and len(spec.key) == 10
    changes = dict(backbone="n", weights_sha256="cd" * 32, data_config={"input_size": [3, 9, 9]}, dtype="float32",
                   amp="bf16", tta="flip", jpeg_draft=False, decode="other", source="hf")
    keys = {replace(spec, **{k: v}).key for k, v in changes.items()}
    assert len(keys | {spec.key}) == len(changes) + 1


def _big_jpegs(root, n=4):
    rng = np.random.default_rng(0)
    for i in range(n):
        smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC))
        noisy = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        path = root / ("a" if i % 2 else "b") / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
    return root


def test_decode_options_make_another_cache_and_verify_follows_them(tmp_path):
    """The issue's observation: `cache verify` always decoded with JPEG draft. A cache's spec says how its
    images were decoded, so re-extracting its rows through the spec reproduces them."""
    data = _big_jpegs(tmp_path / "big")
    [draft] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    [full] = extract(data, TINY, tmp_path / "cache", jpeg_draft=False, workers=0, progress=False)
    assert draft.cache != full.cache
    with FeatureCache(draft.cache) as a, FeatureCache(full.cache) as b:
        assert a.spec.jpeg_draft and not b.spec.jpeg_draft and a.spec.key in draft.cache.name
        assert not np.array_equal(a.features(), b.features())  # the draft did change what the model saw
    for cache in (draft.cache, full.cache):
        report = verify(cache, data, sample=4)
        assert report.ok and report.min_cosine["pooled"] > 0.999, report.problems


def test_caches_written_before_the_spec_are_read_from_their_attributes(folder, tmp_path):
    [res] = extract(folder, TINY, tmp_path / "cache", workers=0, decode="pil", progress=False)  # as they were made
    with FeatureCache(res.cache) as c:
        spec = c.spec
    with h5py.File(res.cache, "r+") as f:
        del f.attrs["feature_spec"]
    with FeatureCache(res.cache) as c:
        assert c.spec == spec
    with pytest.raises(Exception, match="another feature spec"):
        from pipeline.cache import CacheWriter

        CacheWriter(res.cache, replace(spec, tta="flip"), "", "x", {"pooled": 256})


def test_stored_hashes_compare_equal_to_fresh_ones_even_with_trailing_zero_bytes(folder, tmp_path):
    """numpy's fixed-width bytes drop trailing zero bytes: one sha256 in 256 ends with one, and such an
    image was never found in its cache by predict (nor counted as done by a study)."""
    import hashlib

    from pipeline.data import content_hash

    k = 0
    while hashlib.sha256(b"x" * k).digest()[-1] != 0:
        k += 1
    (folder / "train" / "red" / "zero.jpg").write_bytes(b"x" * k)  # not an image: a recorded failure, but a row
    [res] = extract(folder, TINY, tmp_path / "cache", workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        stored = dict(zip(c.ids, c.content_hash))
    assert stored["train/red/zero.jpg"] == content_hash(folder / "train" / "red" / "zero.jpg")
    assert all(stored[i] == content_hash(folder / i) for i in stored)
