import json

import numpy as np
import pytest

from conftest import TINY, run_cli
from pipeline import FeatureCache, PipelineError, best_row, extract, finetune, predict


def test_lp_ft_starts_from_the_probe_and_round_trips(tiny_run, tmp_path):
    probe = best_row(tiny_run["fit"].rows, linear=True)
    res = finetune(tiny_run["data"], TINY, tmp_path / "ft", init=tiny_run["run"], epochs=1, unfreeze=1,
                   batch_size=8, workers=0, device="cpu", progress=False)
    # the classifier starts as the probe, scaling folded in: same accuracy before any training
    assert res.history[0]["val_accuracy"] == pytest.approx(probe["accuracy"])
    assert res.eval_split == "val" and res.classes == ["blue", "red"]
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1] and metrics["epochs"][1]["train_loss"] > 0
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["backbone"] == TINY and config["class_names"] == ["blue", "red"]

    # the checkpoint is a backbone like any other: a distinct cache, with 2-class logits
    [ext] = extract(tiny_run["data"], TINY, tmp_path / "cache", weights=tmp_path / "ft" / "model.safetensors",
                    taps=("pooled", "logits"), workers=0, progress=False)
    assert ext.cache != tiny_run["cache"] and ext.extracted == 36
    with FeatureCache(ext.cache) as c:
        assert c.info()["taps"] == {"pooled": 256, "logits": 2}
        logits, labels, splits = c.features("logits"), c.labels, c.splits
    val = splits == "val"
    acc = np.mean(np.array(["blue", "red"])[logits[val].argmax(1)] == labels[val])
    assert acc == pytest.approx(res.history[-1]["val_accuracy"])

    rows = predict(tmp_path / "ft", [tiny_run["data"] / "val"], workers=0, progress=False)
    assert np.mean([r["prediction"] == r["path"].split("/")[-2] for r in rows]) == pytest.approx(acc)


def test_only_the_top_blocks_change(tiny_run, tmp_path, tiny_weights_dir):
    from safetensors.torch import load_file

    finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, unfreeze=1, batch_size=8, workers=0,
             device="cpu", progress=False)
    before = load_file(str(tiny_weights_dir / f"{TINY}.safetensors"))
    after = load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert np.array_equal(before["conv_stem.weight"].numpy(), after["conv_stem.weight"].numpy())
    assert not np.array_equal(before["conv_head.weight"].numpy(), after["conv_head.weight"].numpy())
    assert after["classifier.weight"].shape == (2, 256)


def test_bad_unfreeze(tiny_run, tmp_path):
    with pytest.raises(PipelineError, match="--unfreeze takes a number of top blocks or 'all'"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", unfreeze="top", progress=False)


def test_cli_finetune(tiny_run, tmp_path):
    r = run_cli("finetune", tiny_run["data"], "--backbone", TINY, "--out", tmp_path / "ft", "--epochs", "1",
                "--unfreeze", "all", "--batch-size", "8", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "epoch 0:" in r.stdout and "epoch 1: train loss" in r.stdout
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def test_init_needs_a_linear_head_for_this_task(tiny_run, tmp_path):
    from pipeline import fit

    fit(tiny_run["cache"], tmp_path / "knn_only", heads=["knn"], n_jobs=1, progress=False)
    with pytest.raises(PipelineError, match="no linear head for task 'shapes'"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", init=tmp_path / "knn_only", progress=False)
