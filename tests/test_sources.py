"""Data sources beyond a folder: webdataset tar shards and Hugging Face style parquet files, whose
images are recognised by content hash across formats, and listings that hold no object per image."""

import io
import os
import json
import tarfile
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, make_image
from pipeline import FeatureCache, PipelineError, extract, fit, load_source
from pipeline.data import content_hash
from pipeline.sources import Stamps, source_name



def _samples(folder):
    """(id, bytes, class, split) of the template folder's images."""
    out = []
    for p in sorted(folder.rglob("*.jpg")):
        split, label = p.relative_to(folder).parts[:2]
        out.append((p.stem, p.read_bytes(), label, split))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shards(folder, out, per_shard=20):
    """The folder's images as webdataset shards: ``<key>.jpg``, ``<key>.cls`` and ``<key>.json`` (split)."""
    out.mkdir(parents=True, exist_ok=True)
    samples = _samples(folder)
    for k in range(0, len(samples), per_shard):
        with tarfile.open(out / f"data-{k // per_shard:06d}.tar", "w") as tar:
            for key, data, label, split in samples[k:k + per_shard]:
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.cls", label.encode())
                _add(tar, f"{key}.json", json.dumps({"split": split}).encode())
    return out


def make_parquet(folder, path, names=("blue", "red")):
    """The folder's images as a datasets-style parquet file: an ``image`` struct column, ``label`` numbers
    named by the datasets metadata, ``split``, in row groups of 10."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = _samples(folder)
    table = pa.table({
        "image": [{"bytes": data, "path": f"{key}.jpg"} for key, data, _, _ in samples],
        "label": [names.index(label) for *_, label, _ in samples],
        "split": [split for *_, split in samples],
    })
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": list(names)}}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
    pq.write_table(table, path, row_group_size=10)
    return path


def _by_hash(cache):
    with FeatureCache(cache) as c:
        return {h: f for h, f, v in zip(c.content_hash, c.features(), c.valid) if v}


def test_shards_and_parquet_give_the_folders_features(folder, tmp_path):
    """The same images as a folder, as webdataset shards and as a parquet file: the same features (matched
    by content hash), labels and splits, and the same probe accuracy."""
    [base] = extract(folder, TINY, tmp_path / "cache", workers=0, progress=False)
    shards = make_shards(folder, tmp_path / "shards")
    table = make_parquet(folder, tmp_path / "images.parquet")
    reference = _by_hash(base.cache)
    accuracy = {}
    for name, data in (("folder", folder), ("folder of shards", shards), ("brace pattern", tmp_path / "shards" / "data-{000000..000001}.tar"),
                       ("parquet", table)):
        [res] = extract(data, TINY, tmp_path / "c" / name.replace(" ", "_"), workers=0, progress=False)
        got = _by_hash(res.cache)
        assert len(got) == 36 and set(got) <= set(reference), name
        np.testing.assert_array_equal(np.stack([got[h] for h in got]), np.stack([reference[h] for h in got]))
        with FeatureCache(res.cache) as c:
            assert set(c.labels) == {"red", "blue"} and set(c.splits) == {"train", "val"}, name
        accuracy[name] = fit(res.cache, tmp_path / "runs" / name.replace(" ", "_"), heads=["logreg"], n_jobs=1,
                             progress=False).rows[0].metrics["accuracy"]
    assert len(set(accuracy.values())) == 1, accuracy
    src = load_source(shards)
    assert src.ids[0] == "data-000000/blue_000" and src.name == "shards"
    assert load_source(table).ids[0] == "images/0"


def test_damage_inside_shards_is_recorded_not_fatal(folder, tmp_path):
    shards = make_shards(folder, tmp_path / "shards", per_shard=100)
    with tarfile.open(shards / "data-000001.tar", "w") as tar:
        _add(tar, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
        _add(tar, "broken.cls", b"red")
        _add(tar, "nolabel.txt", b"red")  # a sample without an image
        _add(tar, "good.jpg", (folder / "val" / "red" / "red_000.jpg").read_bytes())
    whole = (shards / "data-000000.tar").read_bytes()
    (shards / "data-000002.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-member
    [res] = extract(shards, TINY, tmp_path / "cache", workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        failures = {sid: f"{stage}: {reason}" for sid, stage, reason in c.failures}
        valid = dict(zip(c.ids, c.valid))
    assert failures["data-000001/broken"].startswith("decode: ")  # a damaged member: a decode failure, like a file
    assert failures["data-000001/nolabel"].startswith("read: no image member")
    assert valid["data-000001/good"] and res.failed == len(failures)
    damaged = [sid for sid in failures if sid.startswith("data-000002/")]
    assert any("damaged" in failures[sid] for sid in damaged)
    assert sum(v for sid, v in valid.items() if sid.startswith("data-000002/")) > 0  # what came before is kept


def test_a_dotted_manifest_names_its_listing_its_cache_and_its_lock_alike(folder, tmp_path):
    """A source's name is decided once: ``my.data.csv`` is ``my.data`` before listing (the early lock),
    when listed and in the cache's file name, so the lock taken first is the written cache's own."""
    manifest = folder / "my.data.csv"
    manifest.write_text("path,label\n" + "".join(f"{p.relative_to(folder)},{p.parent.name}\n"
                                                 for p in sorted(folder.rglob("*.jpg"))))
    assert source_name(manifest) == "my.data" == load_source(manifest).name
    [res] = extract(manifest, TINY, tmp_path / "cache", workers=0, progress=False)
    assert res.cache.name.startswith("my.data__")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [res.cache.name]  # no lock file left


def test_label_columns_name_the_caches_task_kind(folder, tmp_path):
    rows = ["path,labels,split"] + [f"{p.relative_to(folder)},{p.parent.name}{'|dark' if i % 3 else ''},{p.parts[-3]}"
                                    for i, p in enumerate(sorted(folder.rglob("*.jpg")))]
    (folder / "tags.csv").write_text("\n".join(rows) + "\n")
    [res] = extract(folder / "tags.csv", TINY, tmp_path / "cache", workers=0, progress=False)
    out = fit(res.cache, tmp_path / "run", n_jobs=1, progress=False)
    assert {r.task_kind for r in out.rows} == {"multilabel"} and {r.head for r in out.rows} == {"logreg", "ridge", "knn"}
    (folder / "bad.csv").write_text("path,target\ntrain/red/red_000.jpg,heavy\n")
    [res] = extract(folder / "bad.csv", TINY, tmp_path / "cache2", workers=0, progress=False)
    with pytest.raises(PipelineError, match="target 'heavy' is not a number"):
        fit(res.cache, tmp_path / "run2", n_jobs=1, progress=False)


def test_content_hash_is_the_images_bytes_in_every_source(folder, tmp_path):
    table = make_parquet(folder, tmp_path / "images.parquet")
    src = load_source(table)
    hashes, _, _ = src.content_hashes()
    assert bytes(hashes[0]).ljust(32, b"\0") == content_hash(src[0].path) == content_hash(folder / "train/blue/blue_000.jpg")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["manifest", "shards", "parquet"])
def test_listing_holds_no_object_per_image(tmp_path, kind):
    """Listing and hashing 20,000 samples allocates at most ~200 bytes per sample beyond the columns a
    cache stores (ids, labels, splits, hashes); the images are never all held."""
    n = 20_000
    blob = b"\xff\xd8" + bytes(300)
    if kind == "manifest":
        (tmp_path / "img").mkdir()
        for i in range(n):
            (tmp_path / "img" / f"{i:06d}.jpg").write_bytes(blob + i.to_bytes(4, "little"))
        (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"img/{i:06d}.jpg,c{i % 10}\n" for i in range(n)))
        data = tmp_path / "m.csv"
    elif kind == "shards":
        data = tmp_path / "shards"
        data.mkdir()
        for s in range(4):
            with tarfile.open(data / f"part-{s}.tar", "w") as tar:
                for i in range(s * n // 4, (s + 1) * n // 4):
                    _add(tar, f"{i:06d}.jpg", blob + i.to_bytes(4, "little"))
                    _add(tar, f"{i:06d}.cls", f"c{i % 10}".encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = tmp_path / "p.parquet"
        pq.write_table(pa.table({"jpg": [blob + i.to_bytes(4, "little") for i in range(n)],
                                 "label": [f"c{i % 10}" for i in range(n)]}), data, row_group_size=1000)
    # measured in a fresh process: tracemalloc counts every thread's allocations, and threads earlier
    # tests left in this one (a compiler's, an executor's) once added 15 MB to the peak
    r = subprocess.run([sys.executable, "-c", _MEASURE_LISTING, str(data)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    samples, peak, stored = map(int, r.stdout.split())
    per_sample = (peak - stored) / n
    print(f"{kind}: peak {peak / n:.0f} bytes per sample, {per_sample:.0f} beyond the cache's columns")
    assert samples == n and per_sample < 200


_MEASURE_LISTING = """
import sys, tracemalloc
from pipeline.sources import load_source
load_source(sys.argv[1]).content_hashes()  # what a process pays once (imports, the kinds registry): not measured
tracemalloc.start()
src = load_source(sys.argv[1])
hashes, _, stamps = src.content_hashes()
_, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
stored = sum(len(i) + 49 + 8 for i in src.ids) + 8 * 2 * len(src) + hashes.nbytes + stamps.nbytes  # ids (str objects), label/split pointers, hashes, stamps
print(len(src), peak, stored)
"""


def test_the_same_images_from_another_source_are_copied_not_computed(folder, tmp_path, monkeypatch):
    """A parquet file and tar shards of a folder's images, extracted into the folder's cache folder, take
    every row from the folder's cache (matched by content hash): no forward pass, the same features."""
    import hashlib

    from pipeline.featurizer import Featurizer

    image = (folder / "train" / "blue" / "blue_000.jpg").read_bytes()
    tail = next(bytes([k % 256, k // 256]) for k in range(65536) if hashlib.sha256(image + bytes([k % 256, k // 256])).digest()[-1] == 0)
    (folder / "train" / "blue" / "zero_tail.jpg").write_bytes(image + tail)  # numpy's fixed-width bytes would drop its digest's last byte
    [base] = extract(folder, TINY, tmp_path / "cache", workers=0, progress=False)
    make_image(folder / "train" / "red" / "only_in_the_parquet.jpg", (200, 40, 40), 999)
    table = make_parquet(folder, tmp_path / "images.parquet")
    computed = []
    real = Featurizer.features
    monkeypatch.setattr(Featurizer, "features", lambda self, x, taps: computed.append(len(x)) or real(self, x, taps))
    [res] = extract(table, TINY, tmp_path / "cache", workers=0, progress=False)
    assert (res.copied, res.reused, res.extracted, sum(computed)) == (37, 37, 1, 1)
    got, reference = _by_hash(res.cache), _by_hash(base.cache)
    assert len(got) == 38 and len(set(got) & set(reference)) == 37
    np.testing.assert_array_equal(np.stack([got[h] for h in reference]), np.stack(list(reference.values())))
    [shards] = extract(make_shards(folder, tmp_path / "shards"), TINY, tmp_path / "cache", workers=0, progress=False)
    assert (shards.copied, shards.extracted, sum(computed)) == (38, 0, 1)  # the new image too, from the parquet's cache


def test_shards_listed_in_parallel_equal_one_process_and_keep_one_label_kind(folder, tmp_path, monkeypatch):
    shards = make_shards(folder, tmp_path / "shards", per_shard=7)
    parallel = load_source(shards)
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    alone = load_source(shards)
    assert list(parallel.ids) == list(alone.ids) and len(parallel) == 36
    assert list(parallel.labels) == list(alone.labels) and list(parallel.splits) == list(alone.splits)
    assert (parallel.hashes == alone.hashes).all()
    assert [parallel.locate(i) for i in (0, 20, 35)] == [alone.locate(i) for i in (0, 20, 35)]
    with tarfile.open(shards / "data-000009.tar", "w") as tar:  # after the others: its labels are tags
        _add(tar, "x.jpg", (folder / "train" / "red" / "red_000.jpg").read_bytes())
        _add(tar, "x.json", json.dumps({"labels": ["a", "b"]}).encode())
    monkeypatch.undo()
    with pytest.raises(PipelineError, match="data-000009/x: its label is a multilabel one, the shards' earlier "
                                            "labels classification ones"):
        load_source(shards)


def test_a_stamp_names_its_file_so_an_id_moved_to_another_file_of_one_size_and_time_is_read(tmp_path):
    for name, last in (("a.jpg", b"\x00"), ("b.jpg", b"\x01")):
        (tmp_path / name).write_bytes(b"\xff\xd8" + bytes(99) + last)
        os.utime(tmp_path / name, ns=(10 ** 18, 10 ** 18))  # one size, one modification time
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nx,a.jpg\n")
    src = load_source(manifest)
    hashes, _, stamps = src.content_hashes()
    assert stamps.all()
    manifest.write_text("id,path\nx,b.jpg\n")
    again, _, _ = load_source(manifest).content_hashes(known=Stamps(src.ids, stamps, hashes))
    assert again[0] == content_hash(tmp_path / "b.jpg") != hashes[0]
