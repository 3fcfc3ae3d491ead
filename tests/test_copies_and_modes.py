"""What PyTorch users do to any module works on an STTS model: deep copies are independent models, the model pickles
(as `torch.save(model)` does), and `train()` / `eval()` on the wrapped base model switch STTS with it."""

import copy
import inspect
import pickle

import pytest
import torch

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video

PRUNE_LAYER = 1


def video_batch(model, answers=False):
    samples = [
        Sample(video=moving_square_video(8, 56, 56, square=14, step=(0, 7), seed=1), answer=[31] if answers else None),
        Sample(video=moving_square_video(6, 56, 56, square=14, step=(7, 0), seed=2), answer=[41] if answers else None),
    ]
    return build_qwen_batch(model.config, samples)


def test_a_deep_copy_is_an_independent_model(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = video_batch(model)
    before = stts(**batch)
    twin = copy.deepcopy(stts)
    assert isinstance(twin, STTSModel) and twin.base_model is not stts.base_model
    torch.testing.assert_close(twin(**batch).logits, before.logits, rtol=0, atol=0)

    twin.set_prune_ratio(0.25)
    with torch.no_grad():
        twin.scorer.mlp[-1].bias.add_(1.0)  # the twin's own scorer
    assert twin(**batch).stts.units_after == [int(u * 0.75) for u in before.stts.units_before]
    again = stts(**batch)
    assert again.stts.units_after == before.stts.units_after
    torch.testing.assert_close(again.logits, before.logits, rtol=0, atol=0)

    bare = twin.unload()
    assert not isinstance(bare, STTSModel)
    assert torch.equal(stts(**batch).logits, before.logits)  # the original is still wrapped and pruning


def test_the_model_pickles_like_its_base_model(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = video_batch(model)
    expected = stts(**batch)
    restored = pickle.loads(pickle.dumps(stts))
    out = restored(**batch)
    assert out.stts.units_after == expected.stts.units_after
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
    assert "pixel_values_videos" in inspect.signature(restored.forward).parameters  # the base model's signature


def test_train_and_eval_on_the_wrapped_model_switch_stts(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss_weight=0.5))
    batch = video_batch(model, answers=True)
    assert not stts.training
    model.train()  # as user code or a Trainer would, on the model it holds
    assert stts.training
    out = stts(**batch)
    torch.testing.assert_close(out.loss, out.stts.lm_loss + 0.5 * out.stts.aux_loss)
    model.eval()
    assert not stts.training
    out = stts(**batch)
    assert torch.equal(out.loss, out.stts.lm_loss)
    stts.train()  # and the other way round, as before
    assert model.training and stts.scorer.training


def test_transformers_adapter_api_names_the_stts_equivalent_instead_of_acting_on_the_base(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    assert stts.get_base_model() is model
    for name, equivalent in [
        ("load_adapter", "STTSModel.from_pretrained"),
        ("add_adapter", "apply_stts"),
        ("set_adapter", "set_prune_ratio"),
        ("enable_adapters", "disable_stts"),
        ("disable_adapters", "disable_stts"),
        ("active_adapters", "stts_config"),
        ("delete_adapter", "unload"),
    ]:
        assert hasattr(model, name)  # the base model has it: forwarding would have called it
        with pytest.raises(AttributeError, match=equivalent) as error:
            getattr(stts, name)
        assert "get_base_model()" in str(error.value)
