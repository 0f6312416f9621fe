"""The real backbone on real photos: tf_efficientnet_lite0 with its ImageNet weights on hymenoptera.

Reference figures from a plain script (no project code): pooled features + LogisticRegression 94.8 %
(145/153) val accuracy; the ImageNet head alone (logit 310 ant vs 309 bee) 97.4 %.
"""

from pathlib import Path

import numpy as np
import pytest

from conftest import shared_or_skip
from pipeline import FeatureCache, best_row, extract, finetune, fit, predict

pytestmark = [pytest.mark.real, pytest.mark.slow]
LITE0 = "tf_efficientnet_lite0.in1k"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    data = shared_or_skip("data", "hymenoptera")
    weights = shared_or_skip("weights", f"{LITE0}.safetensors")
    base = tmp_path_factory.mktemp("real")
    [res] = extract(data, LITE0, base / "cache", weights=weights, taps=("pooled", "logits"), progress=False)
    return {"data": data, "weights": weights, "base": base, "extract": res}


def test_extract_all_photos(real):
    res = real["extract"]
    assert (res.extracted, res.failed) == (398, 0)  # imageNotFound.gif and the .jpeg are readable
    with FeatureCache(res.cache) as c:
        info = c.info()
        assert info["taps"] == {"pooled": 1280, "logits": 1000} and info["valid"] == 398
        assert info["weights_sha256"] == "4743420050bc65191b285b8a01361d0089755e5b5233626ea36da5508ca09ada"
        assert info["data_config"]["interpolation"] == "bicubic" and info["data_config"]["mean"] == [0.5, 0.5, 0.5]


def test_zero_shot_imagenet_head_matches_reference(real):
    with FeatureCache(real["extract"].cache) as c:
        logits, labels, splits = c.features("logits"), c.labels, c.splits
    val = splits == "val"
    pred = np.where(logits[val, 310] > logits[val, 309], "ants", "bees")
    assert np.mean(pred == labels[val]) >= 0.97  # 97.4 % in the reference script


def test_rerun_recomputes_nothing(real):
    [again] = extract(real["data"], LITE0, real["extract"].cache.parent, weights=real["weights"],
                      taps=("pooled", "logits"), progress=False)
    assert (again.extracted, again.reused) == (0, 398)


@pytest.fixture(scope="module")
def probe(real):
    return fit(real["extract"].cache, real["base"] / "run", taps=["pooled"], progress=False)


def test_probe_reaches_reference_accuracy(probe):
    rows = {r.head: r for r in probe.rows}
    assert set(rows) == {"logreg", "mlp", "knn"}
    assert rows["logreg"].n_test == 153
    assert rows["logreg"].metrics["accuracy"] >= 145 / 153  # the plain-script reference, 94.8 %
    assert min(r.metrics["accuracy"] for r in rows.values()) >= 0.9


def test_predict_from_run_dir(real, probe):
    images = sorted((Path(real["data"]) / "val" / "bees").glob("*.jpg"))[:10]
    rows = predict(real["base"] / "run", images, progress=False)
    assert sum(r["prediction"] == "bees" for r in rows) >= 9


def test_lp_ft_is_scored_like_the_probe_and_round_trips(real, probe):
    """lp-ft for a few epochs, scored on the probe's val images (its epoch chosen on training images held
    out of training), stays within a few images of the probe, and its checkpoint goes through extract and
    predict."""
    linear = best_row(probe.rows, linear=True)
    res = finetune(real["data"], LITE0, real["base"] / "ft", init=real["base"] / "run", epochs=3,
                   weights=real["weights"], progress=False)
    assert res.strategy == "lp-ft" and res.eval_split == linear.eval == "val"
    assert res.row.comparable and res.row.protocol == linear.protocol and res.n_select == 49
    assert res.metrics["n_test"] == linear.n_test == 153
    assert res.metrics["accuracy"] >= linear.metrics["accuracy"] - 0.03
    [ext] = extract(real["data"], LITE0, real["base"] / "ft_cache", weights=real["base"] / "ft" / "model.safetensors",
                    taps=("logits",), progress=False)
    with FeatureCache(ext.cache) as c:
        logits, labels, splits = c.features("logits"), c.labels, c.splits
    val = splits == "val"
    assert np.mean(np.array(res.classes)[logits[val].argmax(1)] == labels[val]) == pytest.approx(res.metrics["accuracy"])
    rows = predict(real["base"] / "ft", [real["data"] / "val" / "ants"], progress=False)
    assert np.mean([r["prediction"] == "ants" for r in rows]) >= 0.85


def test_sweep_over_both_backbones_is_complete_and_honest(real):
    """Both shared backbones, their concatenation, the folder labels and the coin flip, two heads and
    few-shot draws: every combination has a row, the real task is far above chance, the coin flip is not."""
    lite2 = "tf_efficientnet_lite2.in1k"
    weights2 = shared_or_skip("weights", f"{lite2}.safetensors")
    [res2] = extract(real["data"], lite2, real["base"] / "cache", weights=weights2, progress=False)
    coin = Path(__file__).resolve().parents[1] / "data" / "hymenoptera_coinflip.csv"
    out = real["base"] / "sweep"
    result = fit([real["extract"].cache, res2.cache], out, labels=[coin], heads=["logreg", "knn"], taps=["pooled"],
                 concat=True, shots=[1, 5, "all"], draws=3, progress=False)
    both = f"{LITE0}+{lite2}"
    assert {(r.backbone, r.task, r.head) for r in result.rows} == {
        (b, t, h) for b in (LITE0, lite2, both) for t in ("hymenoptera", "hymenoptera_coinflip") for h in ("logreg", "knn")}
    for r in result.rows:
        if r.task == "hymenoptera":
            assert r.above_chance and r.metrics["accuracy"] >= 0.93, r
        else:
            assert not r.above_chance and r.p_above_chance > 0.05, r  # even before adjusting for many rows
    few = {(r["backbone"], r["task"], r["head"], r["shots"]): r["acc_mean"] for r in result.fewshot}
    assert len(few) == 3 * 2 * 2 * 3
    for b in (LITE0, lite2, both):
        assert few[(b, "hymenoptera", "logreg", 1)] < few[(b, "hymenoptera", "logreg", "all")]
    assert (out / "report.html").stat().st_size > 50_000
