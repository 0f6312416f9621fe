import csv
from importlib import import_module

import pytest

from conftest import make_image, run_cli
from pipeline import PipelineError, predict

predict_module = import_module("pipeline.predict")  # the module; `pipeline.predict` is the function


def test_predict_with_a_saved_head(tiny_run, tmp_path):
    head = next(r["head_file"] for r in tiny_run["fit"].rows if r["head"] == "logreg")
    new = [make_image(tmp_path / "new" / f"r{i}.jpg", (205, 35, 45), 100 + i) for i in range(3)]
    new += [make_image(tmp_path / "new" / f"b{i}.jpg", (35, 55, 215), 200 + i) for i in range(3)]
    (tmp_path / "new" / "broken.jpg").write_text("nope")
    rows = predict(head, [tmp_path / "new"], out=tmp_path / "preds.csv", workers=0, progress=False)
    assert len(rows) == 7
    by_name = {r["path"].split("/")[-1]: r for r in rows}
    assert "not an image Pillow can read" in by_name["broken.jpg"]["error"]
    assert by_name["broken.jpg"]["prediction"] == ""
    for name, row in by_name.items():
        if name != "broken.jpg":
            assert row["prediction"] == ("red" if name.startswith("r") else "blue")
            assert row["prob_red"] + row["prob_blue"] == pytest.approx(1.0)
    with open(tmp_path / "preds.csv") as fh:
        assert list(csv.DictReader(fh))[0].keys() == {"path", "prediction", "error", "prob_blue", "prob_red"}


def test_predict_reuses_cached_rows_without_running_the_backbone(tiny_run, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the backbone should not run for images already in the cache")

    monkeypatch.setattr(predict_module, "load_backbone", fail)
    images = sorted((tiny_run["data"] / "val").rglob("*.jpg"))
    rows = predict(tiny_run["run"], images, progress=False)
    assert len(rows) == 12 and all(r["prediction"] in ("red", "blue") for r in rows)


def test_run_dir_uses_its_best_row(tiny_run):
    from pipeline import best_row
    from pipeline.predict import resolve_model

    best = best_row(tiny_run["fit"].rows)
    assert str(resolve_model(tiny_run["run"]).head_path) == best["head_file"]


def test_predict_refuses_other_weights(tiny_run, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    other = tmp_path / "w"
    other.mkdir()
    model = timm.create_model("test_efficientnet.r160_in1k", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other / "test_efficientnet.r160_in1k.safetensors"))
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(other))
    head = next(r["head_file"] for r in tiny_run["fit"].rows if r["head"] == "knn")
    m = predict_module.resolve_model(head)
    m.weights = None  # as if the original weights file were gone
    with pytest.raises(PipelineError, match="the head was fit on test_efficientnet.r160_in1k weights"):
        predict_module._backbone(m, "cpu")


def test_not_a_model(tmp_path):
    with pytest.raises(PipelineError, match="cannot use .* as a model"):
        predict(tmp_path, [tmp_path])


def test_cli_predict_to_stdout(tiny_run):
    image = next((tiny_run["data"] / "val" / "red").glob("*.jpg"))
    r = run_cli("predict", tiny_run["run"], image, "--no-progress")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("path,prediction,error,prob_") and len(lines) == 2
