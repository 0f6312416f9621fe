"""Model sources beyond timm names: Hugging Face transformers vision models (hf:), a user's own module
(package.module:function), and timm's local-dir: form; each recorded in the feature spec."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, make_image
from pipeline import FeatureCache, PipelineError, extract, finetune, fit, predict

transformers = pytest.importorskip("transformers", reason="the hf: model source needs transformers (the [hf] extra)")


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """A tiny random-weight ViT and ConvNeXt saved as transformers folders (no download)."""
    base = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    vit = base / "vit"
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=37, image_size=32, patch_size=8)).save_pretrained(vit)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vit)
    cnn = base / "convnext"
    transformers.ConvNextModel(transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1])).save_pretrained(cnn)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(cnn)
    return {"vit": vit, "cnn": cnn}


def test_hf_vision_transformer_taps_fit_and_predict(folder, tmp_path, hf_models, monkeypatch):
    monkeypatch.chdir(hf_models["vit"].parent)
    [res] = extract(folder, "hf:vit", tmp_path / "cache", taps=("pooled", "cls", "layer-1"), workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        spec = c.spec
        assert spec.source == "hf" and spec.backbone == f"hf:{hf_models['vit']}"  # absolute: the same from anywhere
        assert c.info()["taps"] == {"cls": 32, "layer2": 32, "pooled": 32}
        assert spec.data_config["input_size"] == [3, 32, 32] and spec.data_config["crop_mode"] == "squash"
        assert spec.data_config["interpolation"] == "bilinear"
        ids, cls = list(c.ids), c.features("cls")
    # what transformers itself computes for the same image, through its own image processor
    from PIL import Image

    model = transformers.AutoModel.from_pretrained(hf_models["vit"]).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(hf_models["vit"])
    with torch.no_grad():
        pixels = processor(images=[Image.open(folder / i).convert("RGB") for i in ids[:8]], return_tensors="pt")
        ref = model(**pixels).last_hidden_state[:, 0].numpy()
    cos = (ref * cls[:8]).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cls[:8], axis=1)
    assert cos.min() > 0.99, cos
    out = fit(res.cache, tmp_path / "run", heads=["logreg"], taps=["pooled"], n_jobs=1, progress=False)
    assert out.rows[0].metrics["accuracy"] >= 0.75
    monkeypatch.chdir(tmp_path)
    moved = shutil.copy(next((folder / "val" / "red").glob("*.jpg")), tmp_path / "new.png")
    [row] = predict(out.out, [moved], workers=0, progress=False)  # not in the cache: the hf model runs
    assert row["error"] == "" and row["prediction"] in ("red", "blue")


def test_hf_cnn_has_pooled_and_layers_but_no_class_token(folder, tmp_path, hf_models):
    [res] = extract(folder, f"hf:{hf_models['cnn']}", tmp_path / "cache", taps=("pooled", "layer1"), workers=0,
                    progress=False)
    with FeatureCache(res.cache) as c:
        assert c.info()["taps"] == {"layer1": 8, "pooled": 64} and c.spec.data_config["crop_pct"] == 0.875
    with pytest.raises(PipelineError, match=r"unknown tap 'cls'; choose from pooled or layer<i> \(the taps of hf:"):
        extract(folder, f"hf:{hf_models['cnn']}", tmp_path / "cache", taps=("cls",), workers=0, progress=False)
    with pytest.raises(PipelineError, match="no transformers vision model and image processor in"):
        extract(folder, f"hf:{tmp_path}", tmp_path / "cache", workers=0, progress=False)


def test_a_users_module_is_a_backbone(folder, tmp_path):
    [res] = extract(folder, "user_nets:tiny_net", tmp_path / "cache", workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        assert c.spec.source == "module" and c.info()["taps"] == {"pooled": 16}
        assert c.attrs["weights_source"] == "module:user_nets:tiny_net"
    out = fit(res.cache, tmp_path / "run", heads=["knn"], n_jobs=1, progress=False)
    image = next((folder / "val" / "blue").glob("*.jpg"))
    shutil.copy(image, tmp_path / "copy.png")
    [row] = predict(out.out, [tmp_path / "copy.png"], workers=0, progress=False)
    assert row["prediction"] == "blue"
    # weights from a file give another spec, and so another cache
    from safetensors.torch import save_file

    from user_nets import tiny_net

    net, _ = tiny_net()
    save_file({k: v + 1.0 for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    [other] = extract(folder, "user_nets:tiny_net", tmp_path / "cache", weights=tmp_path / "w.safetensors",
                      workers=0, progress=False)
    assert other.cache != res.cache
    for name, message in (("user_nets:not_a_pair", "must return \\(torch.nn.Module, data config dict\\)"),
                          ("no_such_module:net", "cannot import 'net' from 'no_such_module'")):
        with pytest.raises(PipelineError, match=message):
            extract(folder, name, tmp_path / "cache", workers=0, progress=False)


def test_sources_never_share_a_cache(folder, tmp_path, tiny_run):
    """timm's local-dir: form reads a fine-tuned folder; its spec (source timm, the folder's weights)
    differs from the base model's, as an hf: or module: one does."""
    ft = finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, batch_size=8, workers=0, device="cpu",
                  progress=False)
    [res] = extract(folder, f"local-dir:{ft.out}", tmp_path / "cache", taps=("logits",), workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        assert c.spec.source == "timm" and c.info()["taps"] == {"logits": 2}
    keys = {Path(p).name.split("__")[-1] for p in (tmp_path / "cache").glob("*.h5")}
    assert len(keys) == 1 and res.cache != tiny_run["cache"]


def test_a_local_dir_cache_serves_new_images(folder, tmp_path, tiny_run, monkeypatch):
    """A cache made through `local-dir:` rebuilds its backbone for an image it does not hold (predict,
    neighbors), from any directory, and names the folder by its absolute path."""
    ft = finetune(tiny_run["data"], TINY, tmp_path / "ft", epochs=1, batch_size=8, workers=0, device="cpu",
                  progress=False)
    monkeypatch.chdir(tmp_path)
    [res] = extract(folder, "local-dir:ft", tmp_path / "cache", workers=0, progress=False)
    with FeatureCache(res.cache) as c:
        assert c.spec.backbone == f"local-dir:{ft.out.resolve()}"
    fit(res.cache, tmp_path / "run", heads=["knn"], n_jobs=1, progress=False)
    new = tmp_path / "new.png"
    make_image(new, (10, 200, 30), 7)
    monkeypatch.chdir(folder)
    [row] = predict(tmp_path / "run", [new])
    assert not row["error"] and row["prediction"]


def test_a_specs_weights_are_found_by_its_model_source(tmp_path, tiny_weights_dir):
    """predict and verify ask the source the spec names: timm checks each candidate file's sha256; the
    others take the file given, else the one recorded, else resolve their own (the hub, the module)."""
    from pipeline.backbones import file_sha256
    from pipeline.model_sources import given_weights, model_source_named

    timm_source, file = model_source_named("timm"), tiny_weights_dir / f"{TINY}.safetensors"
    assert timm_source.find_weights(TINY, file_sha256(file), [], None) == file  # from $PIPELINE_WEIGHTS_DIR
    with pytest.raises(PipelineError, match=f"no weights for {TINY} with sha256 000000000000: looked in "
                                            f"{tmp_path / 'gone.safetensors'} \\(missing\\), {file} \\(other weights"):
        timm_source.find_weights(TINY, "00" * 32, [tmp_path / "gone.safetensors"], None)
    assert timm_source.find_weights(TINY, "00" * 32, [], "hub:timm/x") is None  # the hub has them
    assert model_source_named("module").find_weights is model_source_named("hf").find_weights is given_weights
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert given_weights("m:f", "ab", [tmp_path / "x"], str(tmp_path / "w.safetensors")) == tmp_path / "x"
    assert given_weights("m:f", "ab", [], str(tmp_path / "w.safetensors")) == tmp_path / "w.safetensors"
    assert given_weights("m:f", "ab", [], "module:m:f") is None
    with pytest.raises(PipelineError, match="unknown model source 'nope'; choose from hf, timm, imported, module"):
        model_source_named("nope")
