import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from sklearn.base import clone

from importlib import import_module

from conftest import TINY, make_folder, run_cli
from pipeline import FeatureCache, PipelineError, RunFolder, best_row, extract, finetune, load_head, load_task, predict

finetune_module = import_module("pipeline.stages.finetune")

FAST = dict(batch_size=8, workers=0, device="cpu", progress=False)


def _state(path):
    return torch.load(path / "last.pt", map_location="cpu", weights_only=True)




@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A writable copy of the shared fit run, since finetune appends its row to the leaderboard."""
    return shutil.copytree(tiny_run["run"], tmp_path / "run")


def test_lp_ft_starts_from_the_probe_and_round_trips(tiny_run, run_copy, tmp_path):
    import timm

    probe = best_row(tiny_run["fit"].rows, linear=True)
    res = finetune(tiny_run["data"], TINY, tmp_path / "ft", init=run_copy, epochs=2, unfreeze=1, **FAST)
    assert res.strategy == "lp-ft" and res.eval_split == "val" and res.classes == ["blue", "red"]
    assert [h["epoch"] for h in res.history] == [0, 1, 2]
    assert [h["phase"] for h in res.history] == ["start", "head", "blocks"]
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["best_epoch"] == res.best_epoch and metrics["history"][1]["train_loss"] > 0
    # the epoch is chosen on training images held out of training, never on the scored (val) ones
    ids = metrics["ids"]
    assert set(ids["select"]) and not set(ids["select"]) & set(ids["train"])
    assert all(i.startswith("train/") for i in ids["train"] + ids["select"]) and all(i.startswith("val/") for i in ids["scored"])
    # the classifier starts as the probe (its scaling folded in), refit on exactly the images the network
    # learns from: on the selection images epoch 0 scores what that head scores on their cached features
    task = load_task(tiny_run["cache"])
    where = {i: k for k, i in enumerate(task.ids)}
    learn, sel = [where[i] for i in ids["train"]], [where[i] for i in ids["select"]]
    head = clone(load_head(tiny_run["run"] / probe.head_file)).fit(task.X[learn], task.y[learn])
    assert res.history[0]["score"] == pytest.approx(np.mean(head.predict(task.X[sel]) == task.y[sel]))

    # the run gets a row scored like the probes: same protocol, interval, chance and tests
    rows = RunFolder(run_copy).rows()
    [row] = [r for r in rows if r.head == "finetune:lp-ft"]
    assert row.comparable and row.protocol == probe.protocol and row.eval == "val" and row.n_test == probe.n_test
    assert {"acc_low", "acc_high", "chance"} <= set(row.metrics) and row.above_chance is not None
    assert row.same_as_best is not None and row.head_file == "../ft"
    assert row.metrics["accuracy"] == res.metrics["accuracy"] and len(rows) == len(tiny_run["fit"].rows) + 1
    # ... and its report says so: the row, and the finetune command after fit's
    assert [r["stage"] for r in json.loads((run_copy / "run.json").read_text())] == ["fit", "finetune"]
    assert "finetune:lp-ft" in (run_copy / "report.html").read_text()

    # the kept checkpoint is a backbone like any other: a distinct cache with 2-class logits ...
    [ext] = extract(tiny_run["data"], TINY, tmp_path / "cache", weights=tmp_path / "ft" / "model.safetensors",
                    taps=("pooled", "logits"), workers=0, progress=False)
    assert ext.cache != tiny_run["cache"] and ext.extracted == 36
    with FeatureCache(ext.cache) as c:
        assert c.info()["taps"] == {"pooled": 256, "logits": 2}
        logits, labels, splits = c.features("logits"), c.labels, c.splits
    val = splits == "val"
    acc = np.mean(np.array(["blue", "red"])[logits[val].argmax(1)] == labels[val])
    assert acc == pytest.approx(res.metrics["accuracy"])
    # ... that predict uses directly (through the probe cache's feature spec), and that timm loads
    rows = predict(tmp_path / "ft", [tiny_run["data"] / "val"], workers=0, progress=False)
    assert np.mean([r["prediction"] == r["path"].split("/")[-2] for r in rows]) == pytest.approx(acc)
    model = timm.create_model(f"local-dir:{tmp_path / 'ft'}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == ["blue", "red"] and model.num_classes == 2
    with FeatureCache(tiny_run["cache"]) as c:
        cfg = json.loads((tmp_path / "ft" / "config.json").read_text())["pipeline"]
        assert {k: v for k, v in cfg["feature_spec"].items() if k != "weights_sha256"} == \
            {k: v for k, v in c.spec.to_dict().items() if k != "weights_sha256"}


def test_a_folder_without_splits_is_fine_tuned_per_fold(tmp_path):
    """The issue's first observation: on data without a split, a fine-tune scored on a 20 % hold-out its
    starting head had been trained on ranked first. Now it is scored out of fold like the heads, each
    fold's start refit on that fold's training images only."""
    from pipeline import fit

    data = make_folder(tmp_path / "flat", n_train=8, n_val=2, splits=False)
    [res] = extract(data, TINY, tmp_path / "cache", workers=0, progress=False)
    run = tmp_path / "run"
    probes = fit(res.cache, run, heads=["logreg", "knn"], n_jobs=1, progress=False)
    assert {r.eval for r in probes.rows} == {"cv5"}
    refits = []
    real = finetune_module._Probe._features
    finetune_module._Probe._features = lambda self, ids: refits.append(set(ids)) or real(self, ids)
    try:
        ft = finetune(data, TINY, tmp_path / "ft", init=run, epochs=1, **FAST)
    finally:
        finetune_module._Probe._features = real
    assert ft.eval_split == "cv5" and len(ft.folds) == 6  # five folds, then the final model on every image
    scored = [set(f["ids"]["scored"]) for f in ft.folds[:5]]
    assert set.union(*scored) == {r for r in load_task(res.cache).ids} and sum(map(len, scored)) == 20
    assert len(refits) == 6
    for fold, refit, seen in zip(ft.folds[:5], refits, scored):
        assert not seen & (set(fold["ids"]["train"]) | set(fold["ids"]["select"]))  # never trained on ...
        assert refit == set(fold["ids"]["train"])  # ... nor started from a head that was
    rows = RunFolder(run).rows()
    [row] = [r for r in rows if r.stage == "finetune"]
    assert row.eval == "cv5" and row.n_test == 20 and row.comparable and row.protocol == probes.rows[0].protocol
    assert row.metrics["acc_low"] <= row.metrics["accuracy"] <= row.metrics["acc_high"]
    assert row.metrics["chance"] is not None and row.p_above_chance is not None
    for f in ft.folds[:5]:
        assert (tmp_path / "ft" / f["fold"] / "metrics.json").is_file()  # each fold's record stays ...
        assert not (tmp_path / "ft" / f["fold"] / "model.safetensors").exists()  # ... its model goes
    assert (tmp_path / "ft" / "model.safetensors").is_file()  # the final model predict uses
    preds = predict(run, [data], workers=0, progress=False)
    assert len(preds) == 20


def test_freeze_unfreeze_trains_the_head_then_the_top_blocks(tiny_run, tmp_path, tiny_weights_dir):
    from safetensors.torch import load_file

    before = load_file(str(tiny_weights_dir / f"{TINY}.safetensors"))
    head_only = finetune(tiny_run["data"], TINY, tmp_path / "head", epochs=1, head_epochs=1, unfreeze=1,
                         keep_checkpoints=True, **FAST)
    assert head_only.strategy == "freeze-unfreeze"
    after = _state(tmp_path / "head")["model"]
    assert np.array_equal(before["conv_head.weight"], after["conv_head.weight"])
    assert after["classifier.weight"].shape == (2, 256)

    finetune(tiny_run["data"], TINY, tmp_path / "top", epochs=2, head_epochs=1, unfreeze=1, keep_checkpoints=True,
             **FAST)
    after = _state(tmp_path / "top")["model"]
    assert np.array_equal(before["conv_stem.weight"], after["conv_stem.weight"])
    assert not np.array_equal(before["conv_head.weight"], after["conv_head.weight"])
    # BatchNorm statistics are frozen by default, learned with --bn train
    assert torch.equal(before["bn2.running_mean"], after["bn2.running_mean"])
    finetune(tiny_run["data"], TINY, tmp_path / "bn", epochs=1, head_epochs=0, unfreeze=1, bn="train",
             keep_checkpoints=True, **FAST)
    assert not torch.equal(before["bn2.running_mean"], _state(tmp_path / "bn")["model"]["bn2.running_mean"])


def test_discriminative_learning_rates_decay_towards_the_stem(tiny_run, tmp_path, tiny_weights_dir):
    from safetensors.torch import load_file

    from pipeline import FinetuneConfig
    from pipeline.backbones import load_backbone
    from pipeline.stages.finetune import _prepare
    from pipeline.strategies import get_strategy

    bb = load_backbone(TINY, device="cpu")
    model = _prepare(bb, 2, None, None)
    groups, body = get_strategy("discriminative").param_groups(model, FinetuneConfig(layer_decay=0.5))
    scale = {n: g["lr_scale"] for g in groups for p in g["params"] for n, q in model.named_parameters() if p is q}
    assert scale["classifier.weight"] == 1.0
    assert scale["conv_stem.weight"] < scale["blocks.2.0.conv_exp.weight"] < scale["conv_head.weight"] <= 1.0
    assert len(body) == len(list(model.parameters())) - 2  # every block trains

    res = finetune(tiny_run["data"], TINY, tmp_path / "ft", strategy="discriminative", epochs=1, head_epochs=0,
                   keep_checkpoints=True, **FAST)
    before = load_file(str(tiny_weights_dir / f"{TINY}.safetensors"))
    assert not np.array_equal(before["conv_stem.weight"], _state(tmp_path / "ft")["model"]["conv_stem.weight"])
    assert res.strategy == "discriminative"


def test_accumulation_smoothing_and_standard_augmentation(tiny_run, tmp_path):
    res = finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=2, accum_steps=2, label_smoothing=0.1,
                   aug="standard", amp="off", patience=None, **FAST)
    assert res.n_train == 19 and res.n_select == 5  # 20 % of the 24 training images choose the epoch
    assert res.steps == 2 * math.ceil(math.ceil(res.n_train / 8) / 2)
    # with smoothing 0.1 over 2 classes no prediction scores below the entropy of (0.95, 0.05)
    assert all(h["train_loss"] > 0.198 for h in res.history[1:])


def test_budget_stops_cleanly_and_resume_finishes(tiny_run, tmp_path):
    stopped = finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=2, budget_minutes=1e-5, patience=None, **FAST)
    assert stopped.stopped == "budget" and stopped.steps == 1 and stopped.history[-1]["partial"]
    assert (tmp_path / "ft" / "model.safetensors").is_file() and (tmp_path / "ft" / "last.pt").is_file()
    state = _state(tmp_path / "ft")["training"]
    assert (state["epoch"], state["done"], state["step"]) == (1, 8, 1)

    done = finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=2, patience=None, resume=True, **FAST)
    assert done.resumed_from == {"epoch": 1, "done": 8, "step": 1}
    assert done.stopped == "finished" and done.steps == 2 * math.ceil(done.n_train / 8)
    assert [h["epoch"] for h in done.history] == [0, 1, 1, 2]  # the partial evaluation, then the whole epochs
    with pytest.raises(PipelineError, match="nothing to resume: the run in .* ended \\(finished\\)"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=2, patience=None, resume=True, **FAST)


@pytest.mark.slow
def test_kill_mid_epoch_then_resume_continues(tiny_run, tmp_path):
    """SIGKILL in the middle of an epoch, then --resume: the run continues from its last checkpoint (here
    saved after every optimizer step) and ends with every step done once."""
    out = tmp_path / "ft"
    args = [str(tiny_run["data"]), "--backbone", TINY, "--out", str(out), "--epochs", "2", "--patience", "0",
            "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "finetune", *args, "--checkpoint-minutes", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline, killed = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        try:
            training = _state(out)["training"]
        except (FileNotFoundError, RuntimeError, EOFError):
            training = None
        if training and training["done"] >= 4:  # mid-epoch: an end-of-epoch checkpoint has done == 0
            os.kill(proc.pid, signal.SIGKILL)
            killed = training
            break
        time.sleep(0.02)
    proc.wait()
    assert killed is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
    at_kill = _state(out)["training"]
    assert 0 < at_kill["done"] < 19  # mid-epoch (19 of the 24 training images train, 5 choose the epoch)

    r = run_cli("finetune", *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming {out / 'last.pt'}: epoch {at_kill['epoch']} of 2, {at_kill['done']} of" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"]["step"] == at_kill["step"] > 0
    assert metrics["steps"] == 2 * math.ceil(metrics["n_train"] / 2)
    assert [e["epoch"] for e in metrics["history"]] == [0, 1, 2]


def test_refuses_to_lose_or_mix_runs(tiny_run, tmp_path):
    finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, **FAST)
    with pytest.raises(PipelineError, match="already holds a fine-tuning run .*pass --resume"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, **FAST)
    with pytest.raises(PipelineError, match="nothing to resume: .*last.pt does not exist"):
        finetune(tiny_run["data"], TINY, tmp_path / "other", epochs=1, resume=True, **FAST)
    with pytest.raises(PipelineError, match="nothing to resume: the run in .* ended \\(finished\\)"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, resume=True, **FAST)
    finetune(tiny_run["data"], TINY, tmp_path / "cut", epochs=2, budget_minutes=1e-5, **FAST)
    with pytest.raises(PipelineError, match="these differ: epochs 2 -> 3"):
        finetune(tiny_run["data"], TINY, tmp_path / "cut", epochs=3, resume=True, **FAST)
    (tmp_path / "cut" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="last.pt is not a readable fine-tuning checkpoint"):
        finetune(tiny_run["data"], TINY, tmp_path / "cut", epochs=2, resume=True, **FAST)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="lp"), "--strategy must be one of lp-ft, freeze-unfreeze, discriminative, got 'lp'"),
    (dict(strategy="lp-ft"), "--strategy lp-ft starts the classifier from a fit run's linear head: give --init"),
    (dict(aug="heavy"), "--aug must be one of light, standard, none, got 'heavy'"),
    (dict(bn="sync"), "--bn must be one of freeze, train, got 'sync'"),
    (dict(select_fraction=0.6), "--select-fraction must be in \\[0, 0.5\\), got 0.6"),
    (dict(accum_steps=0), "--accum-steps must be at least 1, got 0"),
    (dict(unfreeze="top"), "--unfreeze must be a number of top blocks \\(0 or more\\) or 'all', got 'top'"),
    (dict(label_smoothing=1.0), "--label-smoothing must be in \\[0, 1\\), got 1.0"),
])
def test_bad_settings_are_named(tiny_run, tmp_path, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", progress=False, **kwargs)
    assert not (tmp_path / "ft").exists()


@pytest.mark.slow
def test_cli_finetune(tiny_run, run_copy, tmp_path):
    r = run_cli("finetune", tiny_run["data"], "--backbone", TINY, "--init", run_copy, "--out", tmp_path / "ft",
                "--epochs", "2", "--unfreeze", "all", "--batch-size", "8", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("estimated ") and "s per epoch with blocks training" in lines[0]
    assert lines[1].startswith("epoch 0 (start): train loss -, selection accuracy ")
    assert "on 5 held-out training images" in lines[1]
    assert lines[2].startswith("epoch 1 (head): train loss") and lines[3].startswith("epoch 2 (blocks)")
    assert lines[5].startswith("scored on val: accuracy ") and "on 12 images (chance " in lines[5]
    assert f"leaderboard row finetune:lp-ft added to {run_copy}" in r.stdout
    r = run_cli("predict", run_copy, tiny_run["data"] / "val", "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr  # the run's best row may now be the fine-tuned network

    r = run_cli("finetune", tiny_run["data"], "--backbone", TINY, "--out", tmp_path / "x", "--strategy", "lp-ft")
    assert r.returncode == 1 and "give --init RUN_DIR" in r.stderr


def test_init_needs_a_linear_head_for_this_task(tiny_run, tmp_path):
    from pipeline import fit

    fit(tiny_run["cache"], tmp_path / "knn_only", heads=["knn"], n_jobs=1, progress=False)
    with pytest.raises(PipelineError, match="no linear head for task 'shapes'"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", init=tmp_path / "knn_only", progress=False)


def test_finished_folds_keep_only_the_model_unless_asked(tiny_run, tmp_path, capsys):
    """Once every training has ended, last.pt and the folds' own models go (the final model, metrics and
    predictions stay); --keep-checkpoints keeps them. --epochs within --head-epochs says no block trains."""
    lines = []
    finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, cv=2, labels=None, log=lines.append, **FAST)
    kept = sorted(p.relative_to(tmp_path / "ft").as_posix() for p in (tmp_path / "ft").rglob("*") if p.is_file())
    assert "model.safetensors" in kept and not [k for k in kept if k.endswith("last.pt")]
    assert not [k for k in kept if "/" in k and k.endswith("model.safetensors")]
    assert any("no block of the backbone is trained; --epochs 2 or more trains the blocks" in x for x in lines)
    assert "model epoch 1 (head): train loss" in capsys.readouterr().err  # each evaluation said as it lands

    finetune(tiny_run["data"], TINY, tmp_path / "keep", epochs=1, keep_checkpoints=True, **FAST)
    assert (tmp_path / "keep" / "last.pt").is_file()


def test_an_interrupted_finetune_says_how_to_go_on(tiny_run, tmp_path, monkeypatch):
    from pipeline.errors import Interrupted
    from pipeline.stages import finetune as finetune_module

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_module._FoldTraining, "_train", stop)
    with pytest.raises(Interrupted, match=f"0 of 1 training\\(s\\) finished in {tmp_path / 'ft'}; the one under way "
                                          "keeps its last.pt .*; the same command with --resume goes on from there"):
        finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, **FAST)
