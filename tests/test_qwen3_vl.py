"""Qwen3-VL specifics (tiny random config, CPU): DeepStack features pruned like the main features whether their ViT
block sits before or after the pruning point, per-slot placeholder runs between timestamps, interleaved M-RoPE.
What every family must do is in test_conformance.py."""

import pytest
import torch

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import IMAGE_TOKEN, VIDEO_TOKEN, Sample, moving_square_video
from stts_adapter.testing.qwen3_vl import QWEN3_VL, SECONDS_TOKEN, build_qwen3_vl_batch

DEEPSTACK = [0, 2, 3]  # ViT blocks tapped: prune layers 0..3 below put each tap before, at and after the pruning
TEXT_LAYERS = 3  # DeepStack adds tap i after decoder layer i: one layer per tap, so that all of them reach the LLM


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("qwen3_vl")
    config = QWEN3_VL.make_config(text_layers=TEXT_LAYERS, deepstack_visual_indexes=DEEPSTACK)
    QWEN3_VL.model_class(config).save_pretrained(directory)
    return directory


@pytest.fixture
def model(saved):
    return QWEN3_VL.model_class.from_pretrained(saved).eval()


def batch_of(model, padding_side="right", answers=True, image=False):
    picture = moving_square_video(1, 64, 96, color=(0.2, 0.3, 1.0), seed=5)[0] if image else None
    samples = [
        Sample(video=QWEN3_VL.video(0), answer=[31, 32, 33] if answers else None, image=picture),
        Sample(video=QWEN3_VL.video(1), prefix=[1, 14], suffix=[25, 26, 27, 28], answer=[41] if answers else None),
    ]
    return build_qwen3_vl_batch(model.config, samples, padding_side)


def language_model_calls(model):
    """Record the keyword arguments of every call of the LLM (`Qwen3VLTextModel`)."""
    calls = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True
    )
    return calls, handle


def deepstack_of(calls):
    (kwargs,) = calls
    return kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]


# --------------------------------------------------------------------------------------------- the layout
def test_every_temporal_slot_is_its_own_placeholder_run_between_timestamps(model):
    batch = batch_of(model, answers=False)
    grid = batch["video_grid_thw"]
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    slots, per_slot = int(grid[0, 0]), int(grid[0, 1:].prod() // 4)
    runs, run = [], 0
    for token in row:
        if token == VIDEO_TOKEN:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert runs == [per_slot] * slots
    assert row.count(SECONDS_TOKEN) == slots
    assert batch["mm_token_type_ids"].eq(2).sum() == batch["input_ids"].eq(VIDEO_TOKEN).sum()


# --------------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("prune_layer", [0, 1, 2, 3])
def test_pruning_nothing_reproduces_the_bare_model_deepstack_included(model, prune_layer):
    """prune_layer 0..3 puts the DeepStack taps (blocks 0, 2, 3) before, at, right after and after the pruning."""
    batch = batch_of(model, image=True)
    calls, handle = language_model_calls(model)
    bare = model(**batch)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.0, prune_layer=prune_layer, method="similarity"))
    out = stts(**batch)
    handle.remove()

    (bare_mask, bare_deepstack), (mask, deepstack) = deepstack_of(calls[:1]), deepstack_of(calls[1:])
    assert torch.equal(mask, bare_mask)
    assert len(deepstack) == len(bare_deepstack) == len(DEEPSTACK)
    for ours, theirs in zip(deepstack, bare_deepstack):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, bare.loss, atol=1e-5, rtol=1e-5)


def test_key_bias_attention_with_zero_bias_equals_the_model_attention(model):
    stts = apply_stts(model, STTSConfig(prune_layer=1))
    visual = model.model.visual
    attention = visual.blocks[2].base_layer.attn.base_layer
    grid = batch_of(model)["video_grid_thw"]
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    torch.manual_seed(0)
    hidden = torch.randn(int(grid.prod(-1).sum()), attention.qkv.in_features)
    position_embeddings = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, visual.spatial_merge_size))
    cu_seqlens = get_vision_cu_seqlens(grid)
    expected = attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
    biased = stts.architecture.attention_with_key_bias(
        attention,
        hidden,
        cu_seqlens=cu_seqlens,
        position_embeddings=position_embeddings,
        key_bias=torch.zeros(hidden.shape[0]),
    )
    torch.testing.assert_close(biased, expected, atol=1e-5, rtol=1e-5)


def test_generate_with_nothing_pruned_is_the_base_models(model):
    """The base model decodes with 4-row (text + M-RoPE) positions from its rope deltas; the pruned path passes the
    3 M-RoPE rows of the prompt and lets generate continue them: the tokens must be the same."""
    batch = batch_of(model, padding_side="left", answers=False)
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.0, prune_layer=1, method="similarity"))
    assert torch.equal(stts.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None), expected)


# --------------------------------------------------------------------------------------------- pruned DeepStack
@pytest.mark.parametrize("prune_layer", [0, 1, 2, 3])
def test_deepstack_features_reach_the_llm_pruned_like_the_main_features(model, prune_layer):
    batch = batch_of(model, answers=False)
    with torch.no_grad():
        bare = model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=prune_layer))
    mergers = [m.base_layer for m in model.model.visual.deepstack_merger_list]
    merged = {}
    hooks = [
        merger.register_forward_hook(lambda module, args, output, i=i: merged.__setitem__(i, output))
        for i, merger in enumerate(mergers)
    ]
    calls, handle = language_model_calls(model)
    out = stts(**batch)
    handle.remove()
    for hook in hooks:
        hook.remove()

    keep = torch.cat([mask.flatten() for mask in out.stts.keep_masks])
    kept = sum(out.stts.units_after)
    assert kept < sum(out.stts.units_before)
    visual_pos_masks, deepstack = deepstack_of(calls)
    pruned_ids = out.stts.prune_like(batch["input_ids"], 0)
    assert torch.equal(visual_pos_masks, pruned_ids == VIDEO_TOKEN)  # the kept placeholders, nothing else
    assert int(visual_pos_masks.sum()) == kept
    assert len(deepstack) == len(DEEPSTACK)
    for tap, (block, features) in enumerate(zip(DEEPSTACK, deepstack)):
        assert features.shape[0] == kept
        if block <= prune_layer:  # the tap saw every token: its kept rows are the bare model's, in placeholder order
            assert merged[tap].shape[0] == len(keep)
            torch.testing.assert_close(features, torch.cat(bare.deepstack_features[tap])[keep])
        else:  # the tap's merger ran on the kept units only, in placeholder order
            assert merged[tap].shape[0] == kept
            torch.testing.assert_close(features, merged[tap])


def test_images_keep_their_deepstack_features_in_a_mixed_batch(model):
    batch = batch_of(model, image=True, answers=False)
    with torch.no_grad():
        image = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=1))
    calls, handle = language_model_calls(model)
    out = stts(**batch)
    handle.remove()

    visual_pos_masks, deepstack = deepstack_of(calls)
    pruned_ids = out.stts.prune_like(batch["input_ids"], 0)
    assert torch.equal(visual_pos_masks, (pruned_ids == VIDEO_TOKEN) | (pruned_ids == IMAGE_TOKEN))
    is_image = pruned_ids[visual_pos_masks] == IMAGE_TOKEN
    assert int(is_image.sum()) == int(batch["input_ids"].eq(IMAGE_TOKEN).sum())
    for tap, features in enumerate(deepstack):
        assert features.shape[0] == int(is_image.sum()) + sum(out.stts.units_after)
        torch.testing.assert_close(features[is_image], torch.cat(image.deepstack_features[tap]))


# --------------------------------------------------------------------------------------------- positions
def test_kept_tokens_keep_their_unpruned_positions_and_a_slot_may_empty(model):
    """At a high ratio whole temporal slots lose every unit: their timestamps and vision_start/end stay, and every
    kept token keeps the position the unpruned sequence gave it (time lives in the text positions)."""
    batch = batch_of(model, answers=False)
    positions, _ = model.model.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        video_grid_thw=batch["video_grid_thw"],
        attention_mask=batch["attention_mask"],
    )
    calls, handle = language_model_calls(model)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.875, prune_layer=1))
    out = stts(**batch)
    handle.remove()

    (kwargs,) = calls
    real = out.stts.attention_mask.bool()
    expected = out.stts.prune_like(positions, 0)
    assert torch.equal(kwargs["position_ids"][:, real], expected[:, real])
    assert any(bool((~mask.any(dim=1)).any()) for mask in out.stts.keep_masks)  # an emptied slot
    pruned_ids = out.stts.prune_like(batch["input_ids"], 0)
    assert int((pruned_ids == SECONDS_TOKEN).sum()) == int(batch["video_grid_thw"][:, 0].sum())
    assert torch.isfinite(out.logits).all()
