"""The feature spec: one record of what determines a cache's features, with one key, written into the
cache and rebuilt by every stage that computes features again."""

from dataclasses import replace

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from pipeline import FeatureCache, FeatureSpec, extract
from pipeline.stages.verify import verify


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


def test_keys_of_existing_caches_never_change():
    """A spec's key is in its cache's name: the same facts give the same key in every version. A record
    written before ``amp``, ``jpeg_draft``, ``decode`` and ``source`` existed reads as what it was made
    with (autocast off, draft, Pillow, timm), whatever the defaults of new work are."""
    import json

    from pipeline.spec import SPEC_INPUTS, spec_from_attrs

    dc = {"input_size": [3, 160, 160], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}
    old = dict(version=1, backbone="test_efficientnet.r160_in1k", weights_sha256="ab" * 32, data_config=dc,
               dtype="float16", tta=None)
    assert FeatureSpec.from_dict(old).key == "4218e6dc29"
    attrs = dict(backbone=old["backbone"], weights_sha256="ab" * 32, data_config=json.dumps(dc), dtype="float16")
    assert spec_from_attrs(attrs).key == "4218e6dc29"  # a cache from before the spec existed
    full = dict(old, amp="bf16", tta="flip", jpeg_draft=False, decode="turbo", source="timm")
    assert FeatureSpec.from_dict(full).key == "0078f64f8b"
    assert FeatureSpec.from_dict(old).amp == "off" != SPEC_INPUTS["amp"].default == "auto"


def test_every_route_takes_the_tables_defaults():
    """The CLI, the Python API and finetune read one table; the study file passes on only what it sets."""
    import inspect

    import cli
    from pipeline.featurizer import Featurizer, planned_spec
    from pipeline.stages.finetune import FinetuneConfig
    from pipeline.spec import SPEC_INPUTS

    for route in (extract, Featurizer.create, planned_spec, cli.extract):
        defaults = {k: inspect.signature(route).parameters[k].default for k in SPEC_INPUTS}
        assert defaults == {k: i.default for k, i in SPEC_INPUTS.items()}, route
    assert FinetuneConfig().amp == inspect.signature(cli.finetune).parameters["amp"].default == "auto"


@pytest.mark.parametrize("name, bad, message", [
    ("amp", "fp8", "--amp must be one of auto, off, bf16, fp16, got 'fp8'"),
    ("decode", "jpeg", "--decode must be one of pil, turbo, nvjpeg, got 'jpeg'"),
    ("dtype", "int8", "--dtype must be one of float16, float32, got 'int8'"),
    ("tta", "none", "--tta must be one of flip, got 'none'"),
])
def test_a_bad_input_gets_one_message_from_every_route(folder, tmp_path, name, bad, message):
    """extract, the featurizer, the planned spec, finetune and the autocast resolver word it alike."""
    import torch

    from pipeline import finetune
    from pipeline.devices import resolve_amp
    from pipeline.errors import PipelineError
    from pipeline.featurizer import Featurizer, planned_spec

    routes = [lambda: extract(folder, TINY, tmp_path / "cache", workers=0, progress=False, **{name: bad}),
              lambda: Featurizer.create(TINY, device="cpu", **{name: bad}),
              lambda: planned_spec(TINY, device="cpu", **{name: bad})]
    if name == "amp":
        routes += [lambda: finetune(folder, TINY, tmp_path / "ft", device="cpu", progress=False, amp=bad),
                   lambda: resolve_amp(bad, torch.device("cpu"))]
    for route in routes:
        with pytest.raises(PipelineError) as e:
            route()
        assert str(e.value) == message
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ft").exists()
