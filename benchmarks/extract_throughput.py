"""How close `extract` runs to the backbone's own speed.

Prints, for one backbone, batch size and device, in one run (medians over --repeats):
  * bare forward images/s: the timm model on a pre-made tensor already on the device, with the same
    autocast and memory format as extract (as timm's benchmark.py measures inference);
  * end-to-end images/s: the whole `extract()` call (listing, hashing, model load, decode, forward,
    HDF5 writes) on photo-like JPEGs into a fresh cache, and the same for its decode-forward-write loop;
  * their ratios;
  * a cost breakdown per image (decode + resize on one core, forward, HDF5 write) that says what the
    remaining gap is made of.

    python benchmarks/extract_throughput.py --backbone tf_efficientnet_lite0.in1k --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.backbones import load_backbone
from pipeline.cache import CacheWriter
from pipeline.stages.extract import extract
from pipeline.preprocess import Normalize, decode_path
from pipeline.sources import load_source
from pipeline.spec import DECODE_NEW, FeatureSpec


def photo_like_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEGs of smooth colour fields with grain (the size and entropy of real photos), in class folders."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(low, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.jpg", quality=90)
    return folder


def bare_forward(bb, batch_size: int, seconds: float) -> float:
    """Images/s of the model alone on a fixed batch already on its device, timed for about ``seconds``."""
    x = torch.randn((batch_size, *bb.data_config["input_size"]), device=bb.device)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            bb.forward(x, ("pooled",))
        sync()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            bb.forward(x, ("pooled",))
            n += 1
        sync()
        return n * batch_size / (time.perf_counter() - start)


def breakdown(bb, data: Path, k: int, jpeg_draft: bool, decode_name: str) -> dict[str, float]:
    """Milliseconds per image in this process: the decode path's decode + resize (one core), forward
    (torch's threads, normalisation included), HDF5 write (batches of 8)."""
    source = load_source(data).subset(np.arange(k))
    samples = source.samples
    path = decode_path(decode_name, bb.data_config, jpeg_draft)
    start = time.perf_counter()
    xs = [path.load(s.path) for s in samples]
    decode = (time.perf_counter() - start) / k
    x = Normalize(bb.data_config, bb.device, bb.channels_last)(path.to_device(path.collate(xs), bb.device)[0])
    with torch.inference_mode():
        bb.forward(x[:2], ("pooled",))
        start = time.perf_counter()
        feats = {k_: v.cpu().numpy() for k_, v in bb.forward(x, ("pooled",)).items()}
        forward = (time.perf_counter() - start) / k
    with tempfile.TemporaryDirectory() as tmp:
        spec = FeatureSpec(bb.name, bb.weights_sha256, bb.data_config)
        with CacheWriter(Path(tmp) / "w.h5", spec, bb.weights_source, "bench", {"pooled": feats["pooled"].shape[1]}) as w:
            w.sync(source, np.full(k, bytes(32), dtype="S32"))
            start = time.perf_counter()
            for i in range(0, k, 8):
                w.write(np.arange(i, min(i + 8, k)), {"pooled": feats["pooled"][i:i + 8]})
            write = (time.perf_counter() - start) / k
    return {"decode+resize": decode * 1e3, "forward": forward * 1e3, "write": write * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--image-size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--data", type=Path, help="use this image folder instead of generated JPEGs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--amp", default="auto")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--jpeg-draft", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--decode", default=DECODE_NEW, help="extract's decode path (pil, turbo, nvjpeg; default: a new cache's)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            w, h = map(int, args.image_size.split("x"))
            data = photo_like_jpegs(Path(tmp) / "photos", args.images, (w, h))
        else:
            data = args.data
        n = len(load_source(data))
        bb = load_backbone(args.backbone, device=args.device, amp=args.amp, channels_last=args.channels_last)
        print(f"backbone {args.backbone}  device {bb.device}  amp {bb.amp}  channels_last {args.channels_last}  "
              f"batch {args.batch_size}  jpeg_draft {args.jpeg_draft}  images {n} ({args.data or args.image_size})  "
              f"torch threads {torch.get_num_threads()}")

        bare, whole, loop = [], [], []
        for r in range(args.repeats):
            bare.append(bare_forward(bb, args.batch_size, seconds=5.0))
            start = time.perf_counter()
            (res,) = extract(data, args.backbone, Path(tmp) / f"cache{r}", batch_size=args.batch_size,
                             workers=args.workers, device=args.device, amp=args.amp,
                             channels_last=args.channels_last, jpeg_draft=args.jpeg_draft, decode=args.decode,
                             progress=False)
            whole.append(n / (time.perf_counter() - start))
            loop.append(res.images_per_s)
            print(f"  repeat {r}: bare {bare[-1]:.1f}  end-to-end {whole[-1]:.1f}  loop {loop[-1]:.1f} images/s")
        b, e, lo = statistics.median(bare), statistics.median(whole), statistics.median(loop)
        print(f"bare forward        {b:8.1f} images/s (median of {args.repeats})")
        print(f"end-to-end extract  {e:8.1f} images/s   ratio {e / b:.2f}")
        print(f"extract loop only   {lo:8.1f} images/s   ratio {lo / b:.2f}")
        cost = breakdown(bb, data, min(64, n), args.jpeg_draft, args.decode)
        print(f"cost per image: decode+resize {cost['decode+resize']:.2f} ms on one core, forward "
              f"{cost['forward']:.2f} ms on {torch.get_num_threads()} threads, HDF5 write {cost['write']:.3f} ms")


if __name__ == "__main__":
    main()
