"""Qwen2.5-VL and Qwen2-VL specifics (tiny random configs, CPU): the windowed ViT and its merger, 3-D M-RoPE
positions, images, training details. What every family must do is in test_conformance.py."""

import math

import pytest
import torch

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.layers import BaseLayerWrapper
from stts_adapter.testing import IMAGE_TOKEN, VIDEO_TOKEN, Sample, build_qwen_batch, moving_square_video

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
PRUNE_LAYER = 1  # block 1 scored, block 2 biased, blocks 3.. pruned (Qwen2.5: block 2 and 3 windowed, 4 full)


def two_video_batch(model, padding_side="left", answers=False):
    """Two different videos: 8 frames of 112x168 and 4 frames of 84x112 (different slots and grids)."""
    samples = [
        Sample(video=moving_square_video(8, 112, 168, seed=0), answer=[31, 32, 33] if answers else None),
        Sample(
            video=moving_square_video(4, 84, 112, color=(0.1, 0.9, 0.2), seed=1),
            prefix=[1, 14],
            suffix=[25, 26, 27, 28],
            answer=[41, 42] if answers else None,
        ),
    ]
    return build_qwen_batch(model.config, samples, padding_side)


def units_of(batch, model):
    merge = model.config.vision_config.spatial_merge_size
    grid = batch["video_grid_thw"]
    return [int(t * (h // merge) * (w // merge)) for t, h, w in grid.tolist()], [
        int((h // merge) * (w // merge)) for _, h, w in grid.tolist()
    ]


def expected_pruned(units, first_frame_units, ratio):
    return [min(int(ratio * n), n - f) for n, f in zip(units, first_frame_units)]


# --------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("family", FAMILIES)
def test_key_bias_attention_with_zero_bias_equals_the_model_attention(load, family):
    """Our re-implementation of block k+1's attention is checked against the model's own."""
    model = load(family)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    entry = stts.architecture
    visual = model.model.visual
    attention = visual.blocks[PRUNE_LAYER + 1].base_layer.attn.base_layer
    batch = two_video_batch(model)
    grid = batch["video_grid_thw"]
    torch.manual_seed(0)
    hidden = torch.randn(int(grid.prod(-1).sum()), attention.qkv.in_features)
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    position_ids = get_vision_position_ids(grid, visual.spatial_merge_size)
    position_embeddings = visual.rotary_pos_emb(hidden, position_ids)
    if family == "qwen2_5_vl":
        _, cu_seqlens = get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    else:
        cu_seqlens = torch.nn.functional.pad(
            torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0, dtype=torch.int32), (1, 0)
        )
    expected = attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
    biased = entry.attention_with_key_bias(
        attention,
        hidden,
        cu_seqlens=cu_seqlens,
        position_embeddings=position_embeddings,
        key_bias=torch.zeros(hidden.shape[0]),
    )
    torch.testing.assert_close(biased, expected, atol=1e-5, rtol=1e-5)
    # A bias does change the output, and only through the biased keys' segments.
    bias = torch.zeros(hidden.shape[0])
    bias[:4] = -2.0
    changed = entry.attention_with_key_bias(
        attention, hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, key_bias=bias
    )
    first_segment = int(cu_seqlens[1])
    assert not torch.allclose(changed[:first_segment], expected[:first_segment])
    torch.testing.assert_close(changed[first_segment:], expected[first_segment:], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.875])
def test_pruned_counts_in_llm_and_vit(load, family, ratio):
    model = load(family)
    batch = two_video_batch(model, padding_side="left")
    units, first_frame_units = units_of(batch, model)
    expected = expected_pruned(units, first_frame_units, ratio)

    seen_after_prune = []
    first_pruned_block = model.model.visual.blocks[PRUNE_LAYER + 2]
    stts = apply_stts(model, STTSConfig(prune_ratio=ratio, prune_layer=PRUNE_LAYER))
    handle = first_pruned_block.register_forward_pre_hook(lambda m, args: seen_after_prune.append(args[0].shape[0]))
    merger_inputs = []
    merger_handle = model.model.visual.merger.base_layer.register_forward_pre_hook(
        lambda m, args: merger_inputs.append(args[0].shape[0])
    )
    out = stts(**batch)
    handle.remove()
    merger_handle.remove()

    patches_per_unit = model.config.vision_config.spatial_merge_size**2
    kept_units = sum(units) - sum(expected)
    assert seen_after_prune == [kept_units * patches_per_unit]
    assert merger_inputs == [kept_units * patches_per_unit]
    assert out.stts.units_before == units
    assert [b - a for b, a in zip(out.stts.units_before, out.stts.units_after)] == expected
    # Every row loses exactly its own video's pruned units; the batch is as long as its longest row.
    real_before = batch["attention_mask"].sum(1).tolist()
    real_after = out.stts.attention_mask.sum(1).tolist()
    assert [b - a for b, a in zip(real_before, real_after)] == expected
    assert out.logits.shape[1] == max(real_after)
    # The first temporal slot is always whole.
    for mask, per_frame in zip(out.stts.keep_masks, first_frame_units):
        assert mask.shape[1] == per_frame and bool(mask[0].all())


def test_prune_ratio_zero_prunes_nothing_and_set_prune_ratio_is_a_runtime_knob(load):
    model = load()
    batch = two_video_batch(model)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.0, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    assert out.stts.units_after == out.stts.units_before
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    stts.set_prune_ratio(0.5)
    units, first = units_of(batch, model)
    out = stts(**batch)
    assert [b - a for b, a in zip(out.stts.units_before, out.stts.units_after)] == expected_pruned(units, first, 0.5)
    with pytest.raises(ValueError, match="prune_ratio"):
        stts.set_prune_ratio(1.0)
    assert stts.stts_config.prune_ratio == 0.5


def test_first_frame_protection_clamps_the_budget(load):
    model = load()
    batch = build_qwen_batch(model.config, [Sample(video=moving_square_video(4, 56, 56))])  # 2 slots x 4 units
    stts = apply_stts(model, STTSConfig(prune_ratio=0.875, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    # floor(0.875 * 8) = 7 > 4 prunable units outside the first slot: all 4 go, the first slot stays.
    assert out.stts.units_after == [4]
    assert out.stts.keep_masks[0].tolist() == [[True] * 4, [False] * 4]
    stts.stts_config.keep_first_frame = False
    out = stts(**batch)
    assert out.stts.units_after == [1]


def test_a_one_slot_video_is_never_pruned_and_gets_no_aux_pairs(load):
    model = load()
    batch = build_qwen_batch(model.config, [Sample(video=moving_square_video(2, 56, 84))])
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER)).train()
    out = stts(**batch)
    assert out.stts.units_after == out.stts.units_before
    assert out.stts.aux_loss.item() == 0.0


# --------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_kept_tokens_keep_their_original_positions_and_padding_side(load, padding_side):
    model = load()
    batch = two_video_batch(model, padding_side=padding_side)
    unpruned, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        None,
        batch["video_grid_thw"],
        batch["second_per_grid_ts"],
        batch["attention_mask"],
    )
    seen = {}
    language_model = model.model.language_model
    handle = language_model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    handle.remove()
    positions, mask = seen["position_ids"], seen["attention_mask"].bool()
    keep = out.stts.keep_tokens
    for row in range(2):
        torch.testing.assert_close(positions[:, row][:, mask[row]], unpruned[:, row][:, keep[row]])
    # Padding stays on its side: left-padded rows end with their last real token, right-padded start with the first.
    if padding_side == "left":
        assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())
    else:
        assert bool(mask[:, 0].all()) and not bool(mask[:, -1].all())
    # Text and special tokens are never dropped.
    ids = batch["input_ids"]
    assert bool(keep[(ids != VIDEO_TOKEN) & batch["attention_mask"].bool()].all())


# --------------------------------------------------------------------------------------------- batches
def test_kept_set_is_text_free_and_deterministic_in_eval(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    video = moving_square_video(8, 112, 112, seed=3)
    first = stts(**build_qwen_batch(model.config, [Sample(video=video)])).stts.keep_masks[0]
    other_text = build_qwen_batch(model.config, [Sample(video=video, prefix=[1, 500, 501, 502], suffix=[7])])
    assert torch.equal(stts(**other_text).stts.keep_masks[0], first)
    again = stts(**build_qwen_batch(model.config, [Sample(video=video)])).stts.keep_masks[0]
    assert torch.equal(again, first)


def test_a_saturated_scorer_still_selects_by_its_logits(load):
    """Scaling and shifting the scorer's last layer keeps the order of its logits but saturates the sigmoid (every
    score exactly 0.0 in float32): the kept set must not change (sorting the tied scores would keep the last units
    of every video, by position)."""
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = two_video_batch(model)
    before = stts(**batch).stts
    last = stts.scorer.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(1000.0)
        last.bias.mul_(1000.0).sub_(1e6)
    after = stts(**batch).stts
    assert all(bool((scores == 0).all()) for scores in after.scores)  # saturated: all tied
    for kept_before, kept_after in zip(before.keep_masks, after.keep_masks):
        assert torch.equal(kept_after, kept_before)

    # ... and is not the positional choice that sorting tied scores makes (the earliest prunable units go first).
    def positional(kept):
        prunable = kept[1:].flatten()
        return torch.arange(len(prunable)) >= len(prunable) - int(prunable.sum())

    assert not torch.equal(before.keep_masks[0][1:].flatten(), positional(before.keep_masks[0]))


# --------------------------------------------------------------------------------------------- generation
def test_generate_with_return_dict_and_several_sequences(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = two_video_batch(model)
    out = stts.generate(**batch, max_new_tokens=3, do_sample=True, num_return_sequences=2, return_dict_in_generate=True)
    prompt = batch["input_ids"].repeat_interleave(2, 0)
    assert out.sequences.shape == (4, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)


def test_text_only_generate_is_the_base_models(load):
    model = load()
    ids = torch.tensor([[1, 5, 6, 7]])
    expected = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    assert torch.equal(stts.generate(input_ids=ids, max_new_tokens=4, do_sample=False), expected)


# --------------------------------------------------------------------------------------------- training
def test_training_loss_adds_the_weighted_aux_loss(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss_weight=0.5)).train()
    out = stts(**batch)
    torch.testing.assert_close(out.loss, out.stts.lm_loss + 0.5 * out.stts.aux_loss)
    stts.eval()
    out = stts(**batch)
    torch.testing.assert_close(out.loss, out.stts.lm_loss)  # evaluation reports the LM loss only


def test_training_loss_adds_the_weighted_logit_penalty(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    config = STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss_weight=0.5, logit_penalty_weight=0.25)
    stts = apply_stts(model, config).train()
    out = stts(**batch)
    mean_square_logit = torch.cat([x.flatten() for x in out.stts.logits]).square().mean()
    torch.testing.assert_close(out.loss, out.stts.lm_loss + 0.5 * out.stts.aux_loss + 0.25 * mean_square_logit)


def test_only_scorer_parameters_are_trainable(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    trainable = {name for name, p in stts.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("scorer.") for name in trainable)
    full = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER, train_base_model=True))
    assert all(p.requires_grad for p in full.parameters())


def test_labels_are_pruned_with_the_inputs(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    # Put labels on video placeholders too, to see them pruned with their tokens.
    labels = torch.where(batch["input_ids"] == VIDEO_TOKEN, batch["input_ids"], batch["labels"])
    batch["labels"] = labels
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    pruned_labels = out.stts.prune_like(labels, -100)
    pruned_ids = out.stts.prune_like(batch["input_ids"], 0)
    real = out.stts.attention_mask.bool()
    assert torch.equal(pruned_labels[real] == VIDEO_TOKEN, pruned_ids[real] == VIDEO_TOKEN)
    assert int((pruned_labels == VIDEO_TOKEN).sum()) == sum(out.stts.units_after)
    expected_loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), pruned_labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected_loss)


def test_gradient_checkpointing_on_the_base_model(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER)).train()
    reference = stts(**batch)
    reference.loss.backward()
    expected = {n: p.grad.clone() for n, p in stts.scorer.named_parameters()}
    stts.zero_grad(set_to_none=True)
    stts.activation_checkpointing_enable()
    assert model.model.visual.blocks[PRUNE_LAYER + 1].base_layer.gradient_checkpointing  # the biased block too
    out = stts(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss)
    for name, parameter in stts.scorer.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- unload, state
def test_unload_restores_the_model_exactly(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = {name: type(m) for name, m in model.named_modules()}
    before_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    before_logits = model(**batch).logits

    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    assert any(isinstance(m, BaseLayerWrapper) for m in model.modules())
    assert list(model.state_dict()) == list(before_state)  # wrappers are invisible to checkpoints
    stts(**batch).loss  # noqa: B018
    restored = stts.unload()

    assert restored is model
    assert not any(isinstance(m, BaseLayerWrapper) for m in model.modules())
    assert {name: type(m) for name, m in model.named_modules()} == before_modules
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before_grad
    state = model.state_dict()
    assert list(state) == list(before_state) and all(torch.equal(state[k], before_state[k]) for k in state)
    assert torch.equal(model(**batch).logits, before_logits)
    with pytest.raises(RuntimeError, match="unloaded"):
        stts(**batch)


def test_wrapped_model_checkpoint_loads_into_a_bare_model(load, tmp_path):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, train_base_model=True))
    with torch.no_grad():
        model.model.visual.blocks[3].base_layer.mlp.up_proj.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path)
    assert torch.equal(
        fresh.model.visual.blocks[3].mlp.up_proj.weight, stts.unload().model.visual.blocks[3].mlp.up_proj.weight
    )


def test_report_contents(load):
    model = load()
    batch = two_video_batch(model)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    report = stts(**batch).stts
    assert not stts.training and report.aux_loss is None and report.logit_penalty is None  # training-only terms
    assert math.isfinite(stts.train()(**batch).stts.aux_loss.item())
    slots = batch["video_grid_thw"][:, 0].tolist()
    assert [m.shape[0] for m in report.keep_masks] == slots
    assert [int(m.sum()) for m in report.keep_masks] == report.units_after
    assert [s.shape for s in report.scores] == [m.shape for m in report.keep_masks]
    assert all(((s > 0) & (s < 1)).all() for s in report.scores)
    assert 0.4 < report.kept_fraction < 0.7
    # The kept units of a frame are its highest-scoring ones within the video's global budget.
    checked = 0
    for scores, mask in zip(report.scores, report.keep_masks):
        later, kept = scores[1:], mask[1:]
        if kept.any() and (~kept).any():
            assert later[kept].min() >= later[~kept].max()
            checked += 1
    assert checked >= 1


def test_return_dict_false_gives_the_base_models_tuple(load):
    model = load()
    batch = two_video_batch(model, answers=True)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    as_tuple = stts(**batch, return_dict=False)
    as_output = stts(**batch)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.loss)
    torch.testing.assert_close(as_tuple[1], as_output.logits)


def test_positional_input_ids_and_passthrough_attributes(load):
    model = load()
    batch = two_video_batch(model)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    ids = batch.pop("input_ids")
    assert stts(ids, **batch).logits.shape[0] == 2
    assert stts.config is model.config
    assert stts.get_input_embeddings() is model.get_input_embeddings()
    assert isinstance(stts, STTSModel)


# --------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("family", FAMILIES)
def test_images_are_never_pruned_in_a_mixed_batch(load, family):
    model = load(family)
    image = moving_square_video(1, 56, 84, color=(0.2, 0.2, 0.9), seed=5)[0]
    samples = [
        Sample(video=moving_square_video(8, 112, 112, seed=0), image=image),
        Sample(video=moving_square_video(4, 84, 112, seed=1)),
    ]
    batch = build_qwen_batch(model.config, samples, padding_side="right")
    bare = model(**batch)
    real = batch["attention_mask"].bool()

    # Oracle: the pruning path with nothing pruned reproduces the bare model, images included.
    nothing = apply_stts(model, STTSConfig(prune_ratio=0.0, prune_layer=PRUNE_LAYER, method="similarity"))
    torch.testing.assert_close(nothing(**batch).logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    nothing.unload()

    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    pruned_ids = out.stts.prune_like(batch["input_ids"], -1)
    assert int((pruned_ids == IMAGE_TOKEN).sum()) == int((batch["input_ids"] == IMAGE_TOKEN).sum())
    assert int((pruned_ids == VIDEO_TOKEN).sum()) == sum(out.stts.units_after) < sum(out.stts.units_before)


@pytest.mark.parametrize("family", FAMILIES)
def test_image_only_batch_is_the_base_model_exactly(load, family):
    model = load(family)
    image = moving_square_video(1, 56, 84, seed=5)[0]
    batch = build_qwen_batch(model.config, [Sample(image=image), Sample(image=image, prefix=[1, 9])])
    bare = model(**batch)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    out = stts(**batch)
    assert torch.equal(out.logits, bare.logits)
    assert out.stts is None


def test_forward_signature_is_the_base_models_so_the_trainer_keeps_the_columns(load, tmp_path):
    import inspect

    from transformers import Trainer, TrainingArguments

    model = load()
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    assert inspect.signature(stts.forward) == inspect.signature(model.forward)
    trainer = Trainer(model=stts, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    trainer._set_signature_columns_if_needed()
    assert {"input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "labels"} <= set(
        trainer._signature_columns
    )
    out = stts(**two_video_batch(model))  # still STTS's forward
    assert out.stts.units_after < out.stts.units_before


def test_report_hooks_see_every_pruning_call_until_removed(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = two_video_batch(model)
    seen = []
    handle = stts.register_report_hook(seen.append)
    out = stts(**batch)
    stts.generate(**batch, max_new_tokens=2, do_sample=False)
    with stts.disable_stts():
        stts(**batch)  # nothing pruned: no report
    handle.remove()
    stts(**batch)
    assert len(seen) == 2 and seen[0] is out.stts and seen[1].units_after == out.stts.units_after
