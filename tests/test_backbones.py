import hashlib

import pytest
import torch

from conftest import TINY
from pipeline import PipelineError, load_backbone


def test_loads_from_weights_dir_in_eval_mode(tiny_weights_dir):
    bb = load_backbone(TINY)
    file = tiny_weights_dir / f"{TINY}.safetensors"
    assert bb.weights_source == str(file)
    assert bb.weights_sha256 == hashlib.sha256(file.read_bytes()).hexdigest()
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.model.parameters())
    # the model's own preprocessing, not a default one
    assert bb.data_config["input_size"] == [3, 160, 160]
    assert bb.data_config["crop_pct"] == 0.95


def test_untagged_name_finds_tagged_file():
    assert load_backbone("test_efficientnet").weights_source.endswith(f"{TINY}.safetensors")


def test_weights_are_really_loaded(tiny_weights_dir):
    from safetensors.torch import load_file

    expected = load_file(str(tiny_weights_dir / f"{TINY}.safetensors"))
    state = load_backbone(TINY).model.state_dict()
    assert torch.equal(state["conv_stem.weight"], expected["conv_stem.weight"])


def test_explicit_weights_file_wins(tmp_path, tiny_weights_dir, monkeypatch):
    monkeypatch.delenv("PIPELINE_WEIGHTS_DIR")
    bb = load_backbone(TINY, weights=tiny_weights_dir / f"{TINY}.safetensors")
    assert bb.weights_source.endswith(".safetensors")


def test_offline_without_weights_names_the_three_places(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(PipelineError) as err:
        load_backbone("resnet10t.c3_in1k")
    msg = str(err.value)
    assert "--weights (not given)" in msg
    assert str(tmp_path / "resnet10t.c3_in1k.safetensors") in msg
    assert "the hub's local cache (the hub is unreachable: offline) failed" in msg
    assert "\n" not in msg


def test_an_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that does not answer is not retried for a minute: the hub's local
    cache is tried at once, offline, and the error names where the weights were looked for."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.delenv("PIPELINE_WEIGHTS_DIR")
    start = time.monotonic()
    with pytest.raises(PipelineError, match="PIPELINE_WEIGHTS_DIR \\(not set\\), and the hub's local cache \\(the hub is unreachable"):
        load_backbone("resnet10t.c3_in1k")
    assert time.monotonic() - start < 10
    assert constants.HF_HUB_OFFLINE is False  # offline only for that call


def test_unknown_backbone_suggests_names():
    with pytest.raises(PipelineError, match="unknown backbone 'tf_efficientnet_lite9'.*did you mean"):
        load_backbone("tf_efficientnet_lite9")


def test_unknown_tag_names_the_tags_timm_has():
    with pytest.raises(PipelineError, match="unknown backbone 'tf_efficientnet_b0.ra_in1k': timm has no tag 'ra_in1k' "
                                            "for tf_efficientnet_b0 \\(it has tf_efficientnet_b0.aa_in1k, "):
        load_backbone("tf_efficientnet_b0.ra_in1k")


def test_weights_that_do_not_fit(tmp_path, tiny_weights_dir):
    """The error says what does not fit (torch's header line alone said nothing), and stays short."""
    with pytest.raises(PipelineError, match="does not fit backbone 'resnet10t'") as err:
        load_backbone("resnet10t", weights=tiny_weights_dir / f"{TINY}.safetensors")
    message = str(err.value)
    assert "Missing key(s) in state_dict" in message and "Unexpected key(s) in state_dict" in message
    assert len(message) < 1200 and "\n" not in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(PipelineError, match="weights file not found"):
        load_backbone(TINY, weights=tmp_path / "none.safetensors")


def test_corrupt_weights_file(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="is not a readable safetensors file"):
        load_backbone(TINY, weights=tmp_path / "bad.safetensors")


def test_logits_are_the_classifier_on_the_pooled_features_in_float32(tiny_weights_dir):
    """Under bf16 autocast the backbone computes in bf16, but its classifier runs in float32 on the pooled
    features: a fine-tune that starts from a probe's head predicts what that head predicts on the cache."""
    bb = load_backbone(TINY, amp="bf16")
    x = torch.rand((4, *bb.data_config["input_size"]))
    with torch.inference_mode():
        out = bb.forward(x, ("pooled", "logits"))
        expected = bb.model.get_classifier()(out["pooled"])
    assert torch.allclose(out["logits"], expected, rtol=1e-5, atol=0)  # bf16 is 3 digits
