"""The same images as an image folder, as webdataset tar shards and as a Hugging Face style parquet file:
their features must be the same (matched by content hash) and give the same probe accuracy.

Packs ``--data`` (a folder laid out [split/]class/image) into shards (``<key>.jpg``, ``<key>.cls``,
``<key>.json`` with the split) and into one parquet file (an ``image`` struct column, ``label`` as class
numbers named in the datasets metadata, ``split``, ``id``), extracts each with ``--backbone``, and prints
per format: images, the largest feature difference to the folder's for the same content hash, and
logreg's accuracy on the data's own split.

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/formats_check.py --data ../shared/data/hymenoptera
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from pipeline import FeatureCache, extract, fit, load_source


def pack(data: Path, out: Path) -> dict[str, Path]:
    src = load_source(data)
    classes = sorted(set(src.labels))
    shards = out / "shards"
    shards.mkdir(parents=True)
    per = 100
    for k in range(0, len(src), per):
        with tarfile.open(shards / f"data-{k // per:06d}.tar", "w") as tar:
            for i in range(k, min(k + per, len(src))):
                s = src[i]
                key = s.id.rsplit(".", 1)[0].replace("/", "_").replace(".", "_")  # a key has no dot (webdataset)
                for ext, blob in ((Path(s.id).suffix[1:].lower(), Path(s.path).read_bytes()), ("cls", s.label.encode()),
                                  ("json", json.dumps({"split": s.split}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": Path(src[i].path).read_bytes(), "path": src.ids[i]} for i in range(len(src))],
                      "label": [classes.index(v) for v in src.labels], "split": list(src.splits), "id": list(src.ids)})
    meta = {"info": {"features": {"label": {"_type": "ClassLabel", "names": classes}}}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps(meta)}), out / "images.parquet",
                   row_group_size=64)
    return {"folder": data, "webdataset shards": shards, "parquet": out / "images.parquet"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/hymenoptera")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        formats = pack(Path(args.data), tmp / "packed")
        reference = None
        print(f"{args.backbone}; features compared by content hash with the folder's")
        print("| format | images | same bytes as the folder | max abs feature difference | logreg accuracy (val) |")
        print("| --- | --- | --- | --- | --- |")
        for name, data in formats.items():
            [res] = extract(data, args.backbone, tmp / "cache" / name.replace(" ", "_"), progress=False)
            with FeatureCache(res.cache) as c:
                feats = {h: f for h, f, v in zip(c.content_hash, c.features(), c.valid) if v}
            reference = reference or feats
            common = set(feats) & set(reference)
            diff = max(float(np.abs(feats[h] - reference[h]).max()) for h in common)
            acc = fit(res.cache, tmp / "run" / name.replace(" ", "_"), heads=["logreg"], progress=False).rows[0]
            print(f"| {name} | {len(feats)} | {len(common)} | {diff:.6f} | {acc.metrics['accuracy']:.4f} ({acc.eval}, "
                  f"n={acc.n_test}) |", flush=True)


if __name__ == "__main__":
    main()
