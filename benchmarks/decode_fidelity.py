"""How close each decode path's features are to timm's own eval transform, on real photos.

The reference is plain timm, written out here without this project's code: Pillow opens the image (full
size, no JPEG draft), ``timm.data.create_transform(**data_config)`` makes the tensor, the model's pooled
features come out in float32 (with ``--tta flip``, the mean of the image's and its mirror's). Each decode
path (``--decodes``, JPEG draft on and off) runs through ``Featurizer`` with float32 (``amp off``) and
float32 storage, so only the preprocessing differs. Prints, per backbone, TTA, path and draft, the mean
and the minimum cosine similarity over the images.

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/decode_fidelity.py --data ../shared/data/hymenoptera
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from pipeline import Featurizer, load_source


def reference(name: str, weights: Path, paths: list[Path], tta: str, batch: int = 32) -> np.ndarray:
    """Pooled float32 features by timm alone."""
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, num_classes=0).eval()
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            f = model(x)
            out.append(((f + model(torch.flip(x, dims=[3]))) / 2 if tta == "flip" else f).numpy())
    return np.concatenate(out)


def ours(name: str, weights: Path, samples: list, tta: str, decode: str, draft: bool) -> np.ndarray:
    fz = Featurizer.create(name, weights, device="cpu", amp="off", dtype="float32", tta=tta or None,
                           jpeg_draft=draft, decode=decode)
    feats = np.zeros((len(samples), fz.backbone.tap_dims(["pooled"])["pooled"]), np.float32)
    for idx, out, failed in fz.batches(samples, ["pooled"], 32, 2):
        assert not failed, failed
        feats[idx] = out["pooled"]
    return feats


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an image folder")
    ap.add_argument("--backbones", default="tf_efficientnet_lite0.in1k,tf_efficientnet_lite2.in1k")
    ap.add_argument("--decodes", default="pil,turbo")
    ap.add_argument("--tta", default=",flip", help="comma-separated: empty for none, flip")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    args = ap.parse_args()

    samples = load_source(args.data).samples
    samples = samples[:args.limit] if args.limit else samples
    paths = [Path(s.path) for s in samples]
    print(f"{len(samples)} images of {args.data}; float32 forward, cosine to timm's own eval transform\n")
    print("| backbone | tta | decode | jpeg draft | mean cosine | min cosine |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.backbones.split(","):
        weights = Path(os.environ["PIPELINE_WEIGHTS_DIR"]) / f"{name}.safetensors"
        for tta in args.tta.split(","):
            ref = reference(name, weights, paths, tta)
            for decode in args.decodes.split(","):
                for draft in (False, True):
                    c = cosines(ours(name, weights, samples, tta, decode, draft), ref)
                    print(f"| {name} | {tta or 'none'} | {decode} | {'on' if draft else 'off'} | {c.mean():.5f} | {c.min():.5f} |",
                          flush=True)


if __name__ == "__main__":
    main()
