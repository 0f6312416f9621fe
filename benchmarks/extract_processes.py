"""`pipeline extract` against the backbone's bare forward pass, as whole processes.

Each repeat starts, one after the other, fresh Python processes that do the whole job, imports and
model load included, on the same generated photo-like JPEGs (500x375 by default):

  * bare: timm alone, the model from its weights file, forward passes over pre-made tensors of the
    backbone's input size (as many images as there are files), with extract's autocast and memory format;
  * plain: a plain script: a torch DataLoader (the same number of workers), Pillow + timm's eval
    transform, the forward pass, the features kept in a numpy array;
  * extract: `pipeline extract DATA --backbone NAME --cache NEW_FOLDER`, once per ``--decode`` path, and with
    ``--compare-code DIR`` the same command with the code in DIR (an export of another commit).

It prints each process's wall seconds per repeat and the medians' ratios: bare / extract (1.0 would be
extract at the forward pass's own rate) and extract / plain.

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/extract_processes.py --images 384 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_throughput import photo_like_jpegs  # noqa: E402

_SETUP = """
import sys, time, timm, torch
name, weights, n, batch, amp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=weights))
model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
cfg = timm.data.resolve_model_data_config(model)
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16")
def forward(x):
    with torch.inference_mode(), autocast:
        return model.forward_head(model.forward_features(x.contiguous(memory_format=torch.channels_last)), pre_logits=True).float()
"""

BARE = _SETUP + """
x = torch.randn((batch, *cfg["input_size"]))
for start in range(0, n, batch):
    forward(x[:min(batch, n - start)])
"""

PLAIN = _SETUP + """
import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder
tf = timm.data.create_transform(**cfg, is_training=False)
data = ImageFolder(sys.argv[6], transform=tf, loader=lambda p: Image.open(p).convert("RGB"))
loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=int(sys.argv[7]))
feats = np.concatenate([forward(x).numpy() for x, _ in loader])
assert len(feats) == n
"""


def timed(cmd: list[str], env: dict, cwd: str) -> float:
    # run from a folder with no code in it: `python -m` puts the working directory first on sys.path,
    # ahead of PYTHONPATH, which picks the code each process times
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=cwd)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--image-size", default="500x375", help="WxH of the generated JPEGs")
    ap.add_argument("--data", type=Path, help="an image folder (class/image) instead of generated JPEGs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", default="default", help="extract's --decode paths to time, comma-separated "
                    "(default: extract's own choice, no flag)")
    ap.add_argument("--extra", default="", help="more extract flags, e.g. '--workers 1'")
    ap.add_argument("--amp", default="bf16", help="autocast of all three (extract's --amp)")
    ap.add_argument("--compare-code", type=Path, help="also time `pipeline extract` (its defaults) with the code in "
                    "this folder (e.g. an export of an earlier commit)")
    args = ap.parse_args()

    weights = Path(os.environ["PIPELINE_WEIGHTS_DIR"]) / f"{args.backbone}.safetensors"
    workers = str(min(4, os.cpu_count() or 1))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or photo_like_jpegs(Path(tmp) / "photos", args.images, tuple(map(int, args.image_size.split("x"))))
        n = sum(1 for p in data.rglob("*") if p.is_file())
        common = [args.backbone, str(weights), str(n), str(args.batch_size), args.amp]
        runs = {"bare": [sys.executable, "-c", BARE, *common],
                "plain": [sys.executable, "-c", PLAIN, *common, str(data), workers]}
        for decode in args.decode.split(","):
            runs[f"extract --decode {decode}"] = [
                sys.executable, "-m", "pipeline", "extract", str(data), "--backbone", args.backbone, "--batch-size",
                str(args.batch_size), "--amp", args.amp, "--no-progress", *args.extra.split(),
                *(["--decode", decode] if decode != "default" else [])]
        envs = {k: env for k in runs}
        if args.compare_code:
            key = f"extract ({args.compare_code.name})"
            runs[key] = [sys.executable, "-m", "pipeline", "extract", str(data), "--backbone", args.backbone,
                         "--batch-size", str(args.batch_size), "--amp", args.amp, "--no-progress"]
            envs[key] = {**env, "PYTHONPATH": str(args.compare_code.resolve())}
        times: dict[str, list[float]] = {k: [] for k in runs}
        print(f"{args.backbone}, {n} images ({args.data or args.image_size}), batch {args.batch_size}, amp {args.amp}, "
              f"{os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
        for r in range(args.repeats):
            for key, cmd in runs.items():
                cache = ["--cache", str(Path(tmp) / f"cache{r}-{len(times[key])}-{key[-5:]}")] if key.startswith("extract") else []
                times[key].append(timed(cmd + cache, envs[key], tmp))
            print(f"  repeat {r}: " + "  ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        for key, seconds in med.items():
            line = f"{key:28s} {seconds:6.2f} s  {n / seconds:6.1f} images/s"
            if key.startswith("extract"):
                line += f"  bare/extract {med['bare'] / seconds:.2f}  plain/extract {med['plain'] / seconds:.2f}"
            print(line)


if __name__ == "__main__":
    main()
