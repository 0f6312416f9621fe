"""What the prediction service saves over `pipeline predict` run once per image.

Prints, in one run against one model:
  * how long `pipeline serve` takes from its start to answering /health;
  * latency per image at batch 1: the median over --requests sequential requests of one image each;
  * images/s under 8 concurrent clients (each sending one image per request), and the mean number of
    images the service put in one forward pass;
  * `pipeline predict RUN IMAGE` as a whole process (import, model load, one image): the median over
    --predict-runs runs.

The images are re-encoded copies (new bytes, so no cache holds them): the service and `predict` both run
the backbone on every one. By default the model is the tiny random-weight test network fit on generated
images; give --run (with --images) for a real one:

    PIPELINE_WEIGHTS_DIR=../shared/weights pipeline extract ../shared/data/hymenoptera \\
        --backbone tf_efficientnet_lite0.in1k --cache /tmp/servebench/cache
    pipeline fit /tmp/servebench/cache --out /tmp/servebench/run
    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/serve_latency.py --run /tmp/servebench/run \\
        --images ../shared/data/hymenoptera/val
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

TINY = "test_efficientnet.r160_in1k"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def tiny_run(base: Path, backbone: str) -> Path:
    """A cache and fit run of ``backbone`` with random weights on generated two-colour images."""
    import timm
    import torch
    from safetensors.torch import save_file

    weights = base / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights / f"{backbone}.safetensors"))
    os.environ["PIPELINE_WEIGHTS_DIR"] = str(weights)
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 12)):
        for name, colour in (("red", (200, 40, 40)), ("blue", (40, 60, 210))):
            for i in range(n):
                arr = np.clip(np.array(colour) + rng.normal(0, 35, (224, 224, 3)), 0, 255).astype(np.uint8)
                (base / "data" / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(base / "data" / split / name / f"{i:03d}.jpg", quality=90)
    from pipeline import extract, fit

    [res] = extract(base / "data", backbone, base / "cache", progress=False)
    return fit(res.cache, base / "run", heads=["logreg"], progress=False).out


def reencoded(images: Path, out: Path, n: int) -> list[Path]:
    """The first ``n`` images under ``images``, re-saved as JPEG (quality 92): same pictures, new bytes."""
    from pipeline.data import list_images, load_image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, p in enumerate(list_images([images])[:n]):
        paths.append(out / f"{k:04d}.jpg")
        load_image(p).save(paths[-1], quality=92)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(client: httpx.Client, url: str, path: Path) -> float:
    """Seconds to send one image and get its row back (a client that keeps its connection, as services do)."""
    start = time.perf_counter()
    client.post(f"{url}/predict", files=[("file", (path.name, path.read_bytes()))], timeout=120).raise_for_status()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a fit run folder (default: the tiny test network on generated images)")
    ap.add_argument("--images", type=Path, help="images to send (default: the run's generated val images)")
    ap.add_argument("--backbone", default=TINY, help="without --run: the backbone of the tiny run (random weights)")
    ap.add_argument("--requests", type=int, default=40, help="sequential one-image requests for the latency")
    ap.add_argument("--concurrent-requests", type=int, default=10, help="requests per client, 8 clients")
    ap.add_argument("--predict-runs", type=int, default=3, help="`pipeline predict` processes for its median")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        run = args.run or tiny_run(base, args.backbone)
        images = reencoded(args.images or base / "data" / "val", base / "new", 64)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        start = time.perf_counter()
        log = (base / "server.log").open("w")
        server = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", str(run), "--port", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
                if server.poll() is not None:
                    raise SystemExit(f"the server exited before it answered:\n{(base / 'server.log').read_text()}")
            startup = time.perf_counter() - start
            about = httpx.get(f"{url}/model").json()
            clients = [httpx.Client() for _ in range(8)]
            for p in images[:3]:  # warm-up: first-call allocations
                post(clients[0], url, p)
            latency = statistics.median(post(clients[0], url, images[k % len(images)]) for k in range(args.requests))
            before = httpx.get(f"{url}/health").json()
            n = 8 * args.concurrent_requests
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda k: post(clients[k % 8], url, images[k % len(images)]), range(n)))
            rate = n / (time.perf_counter() - start)
            after = httpx.get(f"{url}/health").json()
            for client in clients:
                client.close()
        finally:
            server.terminate()
            server.wait()
            log.close()
        passes = after["forward_passes"] - before["forward_passes"]
        whole = []
        for k in range(args.predict_runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline", "predict", str(run), str(images[k]), "--no-progress"],
                           check=True, capture_output=True)
            whole.append(time.perf_counter() - start)

    row = about["row"] or {}
    print(f"model: {run} (row {row.get('backbone')} / {row.get('head')}); CPU: {cpu_name()}, {os.cpu_count()} cores")
    print(f"serve start to first /health answer:            {startup:6.1f} s")
    print(f"serve, batch 1, sequential (median of {args.requests}):      {latency * 1000:6.1f} ms per image")
    print(f"serve, 8 concurrent clients ({n} requests):     {rate:6.1f} images/s "
          f"(mean forward pass {n / max(passes, 1):.1f} images)")
    print(f"pipeline predict, whole process, one image (median of {args.predict_runs}): "
          f"{statistics.median(whole):6.1f} s")


if __name__ == "__main__":
    main()
