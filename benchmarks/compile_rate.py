"""Steady-state images/s of the forward step `extract` runs (normalisation + forward, bf16, batch 32),
with and without ``--compile``, and the first batch's seconds (compilation, or a warm compile cache).

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/compile_rate.py
"""

import statistics
import time

import torch

from pipeline import Featurizer

for compile in (False, True):
    fz = Featurizer.create("tf_efficientnet_lite0.in1k", device="cpu", compile=compile)
    x = torch.randint(0, 256, (32, 3, 224, 224), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    t = time.perf_counter(); fz.features(x, ["pooled"]); first = time.perf_counter() - t
    times = []
    for _ in range(8):
        t = time.perf_counter(); fz.features(x, ["pooled"]); times.append(time.perf_counter() - t)
    print(f"compile={compile}: first batch {first:.1f} s, then {32 / statistics.median(times):.1f} images/s (median of 8 batches)", flush=True)
