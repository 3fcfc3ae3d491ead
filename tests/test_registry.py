"""The registry: recognising models, helpful refusals, and third-party entries."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stts_adapter import (
    STTSConfig,
    UnsupportedModelError,
    apply_stts,
    register_architecture,
    supported_architectures,
)
from stts_adapter.registry import ArchitectureEntry, find_architecture, get_architecture
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video


def tiny_llama():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    )
    return LlamaForCausalLM(config)


def test_builtin_families_are_registered():
    assert {"qwen2_vl", "qwen2_5_vl"} <= set(supported_architectures())


def test_unsupported_model_names_the_supported_families_and_how_to_add_one():
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError) as raised:
        apply_stts(model, STTSConfig())
    message = str(raised.value)
    assert "LlamaForCausalLM" in message and "qwen2_5_vl" in message and "register_architecture" in message
    assert isinstance(raised.value, TypeError)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # untouched


def test_peft_model_around_an_unsupported_model_is_refused_naming_the_inner_model():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        apply_stts(peft_model, STTSConfig())


def test_prune_layer_beyond_the_models_vit_is_refused_naming_the_range(load):
    model = load()  # a 5-block ViT: prune_layer can be 0..3
    with pytest.raises(ValueError, match=r"prune_layer=4.*between 0 and 3"):
        apply_stts(model, STTSConfig(prune_layer=4))
    assert not any(type(m).__name__.startswith("STTS") for m in model.modules())
    apply_stts(model, STTSConfig(prune_layer=3))


def test_applying_twice_is_refused(load):
    stts = apply_stts(load(), STTSConfig(prune_layer=1))
    with pytest.raises(TypeError, match="unload"):
        apply_stts(stts, STTSConfig(prune_layer=1))


def test_a_registered_entry_is_found_and_used(load):
    """A third-party entry (here: the Qwen2.5 entry under another name, claiming the model type) is picked up."""
    qwen = get_architecture("qwen2_5_vl")

    @register_architecture
    class CustomEntry(type(qwen)):
        name = "custom_qwen_like"
        model_types = ("custom_qwen_like",)

    try:
        model = load()
        model.config.model_type = "custom_qwen_like"
        assert "custom_qwen_like" in supported_architectures()
        assert isinstance(find_architecture(model), CustomEntry)
        stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=1))
        batch = build_qwen_batch(model.config, [Sample(video=moving_square_video(4, 56, 84))])
        out = stts(**batch)
        assert stts.stts_config.architecture == "custom_qwen_like"
        assert out.stts.units_after[0] < out.stts.units_before[0]
    finally:
        from stts_adapter import registry

        registry._REGISTRY.pop("custom_qwen_like", None)


def test_registering_something_that_is_not_an_entry_is_refused():
    with pytest.raises(TypeError, match="ArchitectureEntry"):
        register_architecture(object)

    class Incomplete(ArchitectureEntry):
        name = "incomplete"

    with pytest.raises(TypeError, match="model_types"):
        register_architecture(Incomplete)


def test_entry_point_plugins_are_loaded(monkeypatch):
    """Entries from the `stts_adapter.architectures` entry-point group register on first use; a broken plugin only
    logs a warning."""
    from stts_adapter import registry

    class PluginEntry(ArchitectureEntry):
        name = "plugin_vlm"
        model_types = ("plugin_vlm",)
        vision_blocks = "vision.blocks"

    class FakeEntryPoint:
        def __init__(self, name, target):
            self.name, self.target = name, target

        def load(self):
            if isinstance(self.target, Exception):
                raise self.target
            return self.target

    plugins = [FakeEntryPoint("good", PluginEntry), FakeEntryPoint("broken", ImportError("missing dependency"))]
    monkeypatch.setattr(registry, "entry_points", lambda group: plugins if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_BUILTINS_LOADED", False)
    try:
        assert "plugin_vlm" in supported_architectures()
        assert "qwen2_5_vl" in supported_architectures()
    finally:
        registry._REGISTRY.pop("plugin_vlm", None)
