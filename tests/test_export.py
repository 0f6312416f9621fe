"""The single-file export: the backbone, its normalisation and the head in one ONNX or TorchScript file that
gives `predict`'s probabilities on decoded, resized images, with a card saying how to feed it; heads
with no tensor form are refused with the reason."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_image, run_cli, shared_or_skip
from pipeline import (FeatureCache, LoadedModel, PipelineError, RunFolder, export_model, extract, finetune, fit,
                      predict)
from pipeline.stages.export import run_exported
from pipeline.preprocess import decode_path

pytest.importorskip("onnxruntime", reason="the export extra installs onnxruntime")


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory, tiny_weights_dir, _folder_template):
    """A run whose spec computes in float32 (autocast off), as the exported graph does, with every head
    kind of export: linear (logreg, ridge, linear-svm), mlp, and knn (refused)."""
    base = tmp_path_factory.mktemp("export")
    data = Path(shutil.copytree(_folder_template, base / "shapes"))
    [res] = extract(data, TINY, base / "cache", weights=tiny_weights_dir / f"{TINY}.safetensors", workers=0,
                    progress=False, amp="off")
    fit(res.cache, base / "run", heads=["logreg", "ridge", "linear-svm", "mlp", "knn"], n_jobs=1, progress=False)
    return base / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """New images from red to blue, so the probabilities are not all 0 or 1."""
    folder = tmp_path_factory.mktemp("new")
    return [make_image(folder / f"mix{i}.jpg", (200 - 30 * i, 50, 40 + 30 * i), 700 + i) for i in range(6)]


def row_of(run: Path, head: str) -> int:
    return next(k + 1 for k, r in enumerate(RunFolder(run).rows()) if r.head == head)


def pixels(model: Path, paths: list[Path]) -> np.ndarray:
    """What the exported file takes: the images through the spec's decode path, (N, 3, H, W) uint8."""
    spec = LoadedModel(model).model.parts[0].spec
    decoder = decode_path(spec.decode, spec.data_config, spec.jpeg_draft)
    return np.ascontiguousarray(np.stack([decoder.load(p) for p in paths]).transpose(0, 3, 1, 2))


def probabilities(rows: list[dict], classes: list[str]) -> np.ndarray:
    return np.array([[r[f"prob_{c}"] for c in classes] for r in rows])


@pytest.mark.parametrize("head,format", [("logreg", "onnx"), ("mlp", "onnx"), ("ridge", "onnx"),
                                         ("linear-svm", "torchscript"), ("mlp", "torchscript")])
def test_the_exported_file_gives_predicts_probabilities(float32_run, images, tmp_path, head, format):
    row = row_of(float32_run, head)
    result = export_model(float32_run, tmp_path / f"model.{format}", format=format, row=row)
    assert result.max_difference < 1e-4 and result.notes == []
    head_file = float32_run / RunFolder(float32_run).rows()[row - 1].head_file
    expected = probabilities(predict(head_file, images, workers=0, progress=False), ["blue", "red"])
    assert ((expected[:, 1] > 0.01) & (expected[:, 1] < 0.99)).any()  # not only 0s and 1s: a real comparison
    got = run_exported(result.path, format, pixels(head_file, images))
    assert got.shape == (len(images), 2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_tags_and_numbers_export_too(float32_run, tmp_path):
    """The tag kind's sigmoids and the regression kind's number, for a linear head and the mlp (the
    numbers' with its target scaling folded into the last layer)."""
    cache = next((float32_run.parent / "cache").glob("*.h5"))
    with FeatureCache(cache) as c:
        ids, labels, splits = list(c.ids), list(c.labels), list(c.splits)
    (tmp_path / "labels").mkdir()
    rows = list(enumerate(zip(ids, labels, splits)))
    tags = [f"{i},{label}{'|odd' if k % 2 else ''},{split}" for k, (i, label, split) in rows]
    (tmp_path / "labels" / "tags.csv").write_text("\n".join(["id,labels,split", *tags]) + "\n")
    sizes = [f"{i},{(1.0 if label == 'red' else 3.0) + 0.1 * (k % 5)},{split}" for k, (i, label, split) in rows]
    (tmp_path / "labels" / "size.csv").write_text("\n".join(["id,target,split", *sizes]) + "\n")
    run = fit(cache, tmp_path / "run", labels=[tmp_path / "labels"], heads=["ridge", "mlp"], n_jobs=1, progress=False).out
    done = set()
    for k, r in enumerate(RunFolder(run).rows(), 1):
        if r.task == "shapes":
            continue
        result = export_model(run, tmp_path / f"{k}.onnx", row=k)
        assert result.max_difference < 1e-4
        done.add((r.task_kind, r.head))
    assert done == {("multilabel", "ridge"), ("multilabel", "mlp"), ("regression", "ridge"), ("regression", "mlp")}


def test_a_fine_tuned_network_exports_with_its_own_classifier(float32_run, tmp_path):
    folder = finetune(float32_run.parent / "shapes", TINY, tmp_path / "ft", epochs=1, batch_size=8, workers=0,
                      device="cpu", amp="off", progress=False).out
    result = export_model(folder, tmp_path / "ft.pt", format="torchscript")
    assert result.max_difference < 1e-4 and json.loads(result.card.read_text())["head"] is None


def test_the_card_says_how_to_feed_it_and_what_it_scored(float32_run, images, tmp_path):
    row = row_of(float32_run, "logreg")
    result = export_model(float32_run, tmp_path / "m.onnx", row=row)
    assert result.card == tmp_path / "m.onnx.json"
    card = json.loads(result.card.read_text())
    served = RunFolder(float32_run).rows()[row - 1]
    spec = LoadedModel(float32_run, row=row).model.parts[0].spec
    assert card["classes"] == ["blue", "red"] and card["task_kind"] == "classification"
    assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == ["batch", *spec.data_config["input_size"]]
    assert card["data_config"]["mean"] == spec.data_config["mean"] and card["data_config"]["std"] == spec.data_config["std"]
    assert card["data_config"]["interpolation"] == spec.data_config["interpolation"]
    assert card["feature_spec_key"] == served.spec == spec.key
    assert card["row"]["head"] == "logreg" and card["row"]["accuracy"] == served.score
    assert card["protocol"]["id"] == served.protocol
    given = card["input"]  # its recipe makes the pixels predict makes: the spec's decode path, not timm's transform alone
    assert given["decode"] == spec.decode and f"decode path {spec.decode!r}" in given["pixels"]
    recipe = decode_path(given["decode"], card["data_config"], given["jpeg_draft"])
    np.testing.assert_array_equal(recipe.load(images[0]), decode_path(spec.decode, spec.data_config, spec.jpeg_draft).load(images[0]))


def test_heads_without_a_tensor_form_are_refused_with_the_reason(float32_run, tmp_path):
    with pytest.raises(PipelineError, match="k nearest neighbours look up the training features"):
        export_model(float32_run, tmp_path / "knn.onnx", row=row_of(float32_run, "knn"))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineError, match="--format must be one of onnx, torchscript, got 'tflite'"):
        export_model(float32_run, tmp_path / "m.tflite", format="tflite")


def test_a_spec_under_autocast_keeps_it_in_torchscript_and_says_so_in_onnx(tiny_run, tmp_path):
    """A spec computed under bf16 autocast (the default where the CPU or GPU has it): the TorchScript file
    runs the backbone under it and gives predict's scores; the ONNX graph computes in float32, differs by
    that rounding, and the result and card say so."""
    spec = LoadedModel(tiny_run["run"]).model.parts[0].spec
    if spec.amp == "off":
        pytest.skip("this machine computes the default spec in float32")
    row = row_of(tiny_run["run"], "logreg")
    kept = export_model(tiny_run["run"], tmp_path / "m.pt", format="torchscript", row=row)
    assert kept.notes == [] and kept.max_difference <= 1e-4
    onnx = export_model(tiny_run["run"], tmp_path / "m.onnx", row=row)
    assert len(onnx.notes) == 1 and f"under {spec.amp} autocast" in onnx.notes[0]
    assert json.loads(onnx.card.read_text())["notes"] == onnx.notes


@pytest.mark.real
@pytest.mark.slow
def test_real_lite0_on_hymenoptera_val(tmp_path):
    data = shared_or_skip("data", "hymenoptera")
    weights = shared_or_skip("weights", "tf_efficientnet_lite0.in1k.safetensors")
    [res] = extract(data, "tf_efficientnet_lite0.in1k", tmp_path / "cache", weights=weights, amp="off", progress=False)
    run = fit(res.cache, tmp_path / "run", heads=["logreg"], progress=False).out
    result = export_model(run, tmp_path / "lite0.onnx")
    val = sorted((data / "val").rglob("*.jp*g"))
    classes = LoadedModel(run).model.classes
    expected = probabilities(predict(run, val, progress=False), classes)
    got = run_exported(result.path, "onnx", pixels(run, val))
    assert len(val) >= 150
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.slow
def test_cli_export_writes_the_file_or_says_why_not(float32_run, tmp_path):
    r = run_cli("export", float32_run, "--row", row_of(float32_run, "ridge"), "--out", tmp_path / "m.onnx")
    assert r.returncode == 0, r.stderr
    assert f"wrote {tmp_path / 'm.onnx'} and its card {tmp_path / 'm.onnx.json'}" in r.stdout
    r = run_cli("export", float32_run, "--row", row_of(float32_run, "knn"), "--out", tmp_path / "k.onnx")
    assert r.returncode == 1 and "error: the head (CappedKNeighborsClassifier) has no tensor form" in r.stderr
