"""Loading by adapter id alone, as PEFT's `AutoPeftModel...`: `AutoSTTSModel.from_pretrained(adapter)` loads the base
model the adapter records, with its family's loader, and the adapter onto it; `STTSConfig.from_pretrained` reads the
config alone."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from stts_adapter import AdapterLoadError, AutoSTTSModel, STTSConfig, STTSModel, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, tiny_qwen2_5_vl_config

PRUNE_LAYER = 1


def trained_adapter(load, tmp_path):
    """A tiny model loaded from disk (so its config records where), a scorer moved off its init, saved."""
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    with torch.no_grad():
        for parameter in stts.scorer.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    stts.save_pretrained(tmp_path / "adapter")
    return stts, tmp_path / "adapter"


def test_the_base_model_and_the_adapter_load_from_the_adapter_id_alone(load, tmp_path):
    stts, adapter = trained_adapter(load, tmp_path)
    batch = build_qwen_batch(stts.config, [Sample(video=moving_square_video(8, 56, 56, square=14, step=(0, 7)))])
    expected = stts.eval()(**batch)

    loaded = AutoSTTSModel.from_pretrained(adapter)
    assert isinstance(loaded, STTSModel) and type(loaded.base_model) is Qwen2_5_VLForConditionalGeneration
    assert loaded.base_model is not stts.base_model and not loaded.training
    out = loaded(**batch)
    assert all(torch.equal(a, b) for a, b in zip(out.stts.keep_masks, expected.stts.keep_masks))
    torch.testing.assert_close(out.logits, expected.logits)

    double = AutoSTTSModel.from_pretrained(adapter, dtype=torch.float64, is_trainable=True)  # passed to the base
    assert next(double.base_model.parameters()).dtype == torch.float64
    assert all(p.requires_grad for p in double.scorer.parameters())


def test_stts_config_from_pretrained_reads_the_saved_config(load, tmp_path):
    stts, adapter = trained_adapter(load, tmp_path)
    config = STTSConfig.from_pretrained(adapter)
    written_at_save = ("stts_adapter_version", "weights_sha256")
    expected = {k: v for k, v in stts.stts_config.to_dict().items() if k not in written_at_save}
    assert {k: v for k, v in config.to_dict().items() if k in expected} == expected
    with pytest.raises(AdapterLoadError, match="not an STTS adapter folder"):
        STTSConfig.from_pretrained(tmp_path)


def test_an_adapter_without_a_base_model_id_says_how_to_load_it(tmp_path):
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())  # built from a config: no name or path
    apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER)).save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match=r"STTSModel\.from_pretrained\(base_model, adapter\)"):
        AutoSTTSModel.from_pretrained(tmp_path)


def test_a_timm_adapter_loads_its_base_with_timm_create_model(tmp_path):
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4)
    stts = apply_stts(vit, STTSConfig(prune_layer=PRUNE_LAYER))
    stts.save_pretrained(tmp_path)
    assert stts.stts_config.base_model_name_or_path == "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    loaded = AutoSTTSModel.from_pretrained(tmp_path, pretrained=False, img_size=64, depth=4)
    assert type(loaded.base_model) is type(vit)
    for name, tensor in stts.scorer.state_dict().items():
        assert torch.equal(loaded.scorer.state_dict()[name], tensor)
