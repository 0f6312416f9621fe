"""The trade a user weighs: a linear probe on cached features against fine-tuning the network.

Runs, in one process and under one evaluation protocol (the run's): `extract` (features, once), `fit`
with a logistic regression probe, then `finetune` for each strategy and autocast setting asked for (lp-ft
starts from the probe; the others from a fresh classifier), each scored on the probe's images with its
epoch chosen on training images held out of training. Prints each one's accuracy on the scored images,
the selection accuracy of its last epoch, wall time, training images/s, and its wall time as a multiple
of the probe's (extract + fit).

    PIPELINE_WEIGHTS_DIR=../shared/weights python benchmarks/finetune_vs_probe.py --data ../shared/data/hymenoptera
    python benchmarks/finetune_vs_probe.py --device cuda --amp auto,off     # training images/s with and without AMP
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline import best_row, extract, finetune, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/hymenoptera")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0.in1k")
    ap.add_argument("--weights", default=None, help="weights file (default: $PIPELINE_WEIGHTS_DIR)")
    ap.add_argument("--strategies", default="lp-ft,freeze-unfreeze")
    ap.add_argument("--amp", default="auto", help="comma-separated autocast settings to train under")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        [ext] = extract(args.data, args.backbone, tmp / "cache", weights=args.weights, batch_size=args.batch_size,
                        device=args.device, progress=False)
        extract_s = time.perf_counter() - start
        start = time.perf_counter()
        probe = best_row(fit(ext.cache, tmp / "run", heads=["logreg"], progress=False).rows, linear=True)
        fit_s = time.perf_counter() - start
        probe_s = extract_s + fit_s
        rows.append(dict(method="probe: extract + fit logreg", acc=probe.metrics["accuracy"], last=None,
                         wall=probe_s, ips=None, note=f"extract {extract_s:.1f} s, fit {fit_s:.1f} s"))
        for strategy in args.strategies.split(","):
            for amp in args.amp.split(","):
                start = time.perf_counter()
                res = finetune(args.data, args.backbone, tmp / f"ft-{strategy}-{amp}",
                               tmp / "run" if strategy == "lp-ft" else None, run=tmp / "run", strategy=strategy,
                               amp=amp, epochs=args.epochs, weights=args.weights, batch_size=args.batch_size,
                               device=args.device, patience=None, progress=False)
                wall = time.perf_counter() - start
                trained = sum(not h["partial"] for h in res.history[1:]) * res.n_train
                seconds = res.history[-1]["train_seconds"]
                rows.append(dict(
                    method=f"finetune {strategy} (amp {amp})", acc=res.metrics["accuracy"], last=res.history[-1]["score"],
                    wall=wall, ips=trained / seconds if seconds else None,
                    note="selection accuracy by epoch " + " ".join(f"{h['score']:.3f}" for h in res.history)
                    + f"; best epoch {res.best_epoch}; estimated {res.estimate['total_seconds']:.0f} s",
                ))

    print(f"{args.backbone} on {args.data}, scored on {probe.eval} ({probe.n_test} images), "
          f"{args.epochs} fine-tuning epochs, batch {args.batch_size}")
    print(f"| method | {probe.eval} acc (kept epoch) | last epoch's selection acc | wall s | x probe time | train img/s | detail |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ips = f"{r['ips']:.1f}" if r["ips"] else ""
        last = f"{r['last']:.4f}" if r["last"] is not None else ""
        print(f"| {r['method']} | {r['acc']:.4f} | {last} | {r['wall']:.1f} | {r['wall'] / probe_s:.1f} "
              f"| {ips} | {r['note']} |")


if __name__ == "__main__":
    main()
