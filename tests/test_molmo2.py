"""Molmo2 specifics (tiny random configs, CPU): pooling windows as units (smaller at the grid edge), the two ViT
layers the adapter reads in the original layout, frame markers and timestamps, `mm_token_type_ids`. What every
family must do is in test_conformance.py (run it with STTS_CONFORMANCE_CASES=stts_adapter.testing.molmo2:MOLMO2)."""

import pytest
import torch
from transformers import Molmo2ForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.errors import STTSInputError
from stts_adapter.model_registry.molmo2 import pooling_indexes_each_video
from stts_adapter.runtime import active_pass
from stts_adapter.testing import Sample, moving_square_video
from stts_adapter.testing.molmo2 import (
    FRAME_END,
    FRAME_START,
    IMAGE_PATCH,
    build_molmo2_batch,
    image_token_ids,
    tiny_molmo2_config,
)

PRUNE_LAYER = 1  # block 1 scored, block 2 biased, blocks 3.. pruned; the adapter reads blocks 4 and 3, block 5 unread


def tiny_model(**config):
    torch.manual_seed(0)
    return Molmo2ForConditionalGeneration(tiny_molmo2_config(**config)).eval()


def two_videos(answers=False):
    """4 frames of 84x112 and 3 frames of 56x56: different frame counts and sizes (the processor resizes)."""
    return [
        Sample(
            video=moving_square_video(4, 84, 112, square=14, step=(0, 14), seed=0), answer=[31, 32] if answers else None
        ),
        Sample(
            video=moving_square_video(3, 56, 56, square=14, color=(0.1, 0.9, 0.2), step=(14, 0), seed=1),
            prefix=[1, 14],
            suffix=[25, 26, 27, 28],
            answer=[41] if answers else None,
        ),
    ]


def batch_wide_pooling(batch):
    """`video_token_pooling` as indices into all the batch's patches: from transformers 5.25 each video's windows
    index that video's own patches (`pooling_indexes_each_video`), so the earlier videos' patches are added here."""
    pooling = batch["video_token_pooling"].long()
    if not pooling_indexes_each_video():
        return pooling
    patches_per_frame = batch["pixel_values_videos"].shape[1]
    offsets, first = [], 0
    for frames, rows, columns in batch["video_grids"].tolist():
        offsets += [first] * (frames * rows * columns)
        first += frames * patches_per_frame
    offset = torch.tensor(offsets)[:, None]
    return torch.where(pooling >= 0, pooling + offset, pooling)


def unit_of_token(batch):
    """`(frames * patches,)` window of every patch, read off the processor's pooling indices (-1: in none)."""
    pooling = batch_wide_pooling(batch)
    token_unit = torch.full((batch["pixel_values_videos"].shape[:2].numel(),), -1)
    rows = torch.arange(pooling.shape[0])[:, None].expand_as(pooling)
    token_unit[pooling[pooling >= 0]] = rows[pooling >= 0]
    return token_unit


def base_model_inputs(model):
    """Record the keyword arguments the STTS model hands the transformers `Molmo2Model`."""
    seen = []
    handle = model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    return seen, handle


# --------------------------------------------------------------------------------------------- units
def test_edge_windows_are_smaller_units_and_the_vit_runs_exactly_their_patches():
    """98 px = 7x7 patches: the 3x3 windows overhang the grid by one patch on every side (4, 6 or 9 patches)."""
    model = tiny_model(image_size=98)
    batch = build_molmo2_batch(model.config, two_videos(), "right")
    bare = model(**batch)
    sizes = torch.bincount(unit_of_token(batch))
    assert sizes[:9].tolist() == [4, 6, 4, 6, 9, 6, 4, 6, 4]
    assert int(sizes.sum()) == batch["pixel_values_videos"].shape[:2].numel()  # the windows cover every patch

    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.0, method="similarity"))
    nothing_pruned = stts(**batch)
    real = batch["attention_mask"].bool()  # positions at the padding are unspecified
    torch.testing.assert_close(nothing_pruned.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)

    stts.set_prune_ratio(0.5)
    packed = []
    block = stts.architecture.get_vision_blocks(model)[PRUNE_LAYER + 2].base_layer
    handle = block.register_forward_pre_hook(lambda module, args: packed.append(int(active_pass().pruned.valid.sum())))
    out = stts(**batch)
    handle.remove()
    keep = torch.cat([mask.flatten() for mask in out.stts.keep_masks])
    assert out.stts.units_after == [18, 14]  # floor(0.5 x units), first frames whole
    assert packed == [int(sizes[keep].sum())]  # exactly the kept windows' real patches, whatever their size


# --------------------------------------------------------------------------------------------- the ViT
def test_the_adapter_reads_both_feature_layers_of_the_kept_windows_in_the_original_layout():
    """Oracle: every frame's kept patches run blocks 3.. alone (no mask), and the adapter pools the two layers,
    deep first as configured, on the kept windows. 126 px = 9x9 patches in 9 full windows, as in the real model."""
    model = tiny_model(image_size=126)
    batch = build_molmo2_batch(model.config, two_videos(), "left")
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.5, method="random"))  # no key bias
    tower = model.model.vision_tower
    adapter_calls, last_block_calls = [], []
    hooks = [
        model.model.multi_modal_projector.register_forward_hook(
            lambda module, args, output: adapter_calls.append((args[1], output.last_hidden_state))
        ),
        tower.layers[5].base_layer.register_forward_pre_hook(lambda module, args: last_block_calls.append(1)),
    ]
    out = stts(**batch)
    for hook in hooks:
        hook.remove()
    keep = torch.cat([mask.flatten() for mask in out.stts.keep_masks])
    assert not bool(keep.all())

    frames, patches = batch["pixel_values_videos"].shape[:2]
    keep_token = keep[unit_of_token(batch)].view(frames, patches)
    with torch.no_grad():
        hidden = tower.patch_embedding(batch["pixel_values_videos"]) + tower.positional_embedding[None]
        for block in range(PRUNE_LAYER + 2):
            hidden = tower.layers[block](hidden, None)
        layers = {3: hidden.clone(), 4: hidden.clone()}
        for frame in range(frames):
            kept = hidden[frame, keep_token[frame]][None]
            for block in (3, 4):
                kept = tower.layers[block](kept, None)
                layers[block][frame, keep_token[frame]] = kept[0]
        pooling = batch_wide_pooling(batch)[keep]
        # vision_feature_layer (-2, 3): hidden_states[-2] and hidden_states[3 + 1], i.e. blocks 4 and 3, in that order
        expected = model.model.multi_modal_projector(torch.cat([layers[4], layers[3]], -1), pooling).last_hidden_state
        swapped = model.model.multi_modal_projector(torch.cat([layers[3], layers[4]], -1), pooling).last_hidden_state

    ((adapter_pooling, pooled),) = adapter_calls
    assert torch.equal(adapter_pooling, pooling)  # the adapter pools the kept windows only
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled, swapped, atol=1e-3)  # the concatenation order is checked, not incidental
    assert last_block_calls == []  # no layer reads block 5: it is skipped


def test_at_the_paper_prune_layer_kept_windows_get_exactly_the_bare_features():
    """prune_layer 3: the adapter's layers (blocks 3 and 4 = k + 1) are complete before anything is pruned, so
    without the key bias (method "random") every kept window's features are the bare model's."""
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(), "left")
    with torch.no_grad():
        bare = model.get_video_features(
            batch["pixel_values_videos"], batch["video_token_pooling"], batch["video_grids"]
        )
    stts = apply_stts(model, STTSConfig(prune_layer=3, prune_ratio=0.5, method="random"))
    calls = []
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: calls.append(output.last_hidden_state)
    )
    out = stts(**batch)
    hook.remove()
    keep = torch.cat([mask.flatten() for mask in out.stts.keep_masks])
    torch.testing.assert_close(calls[0], torch.cat(bare.pooler_output)[keep], atol=1e-5, rtol=1e-5)
    assert out.stts.units_after == [8, 6]


def test_the_key_bias_reaches_block_k_plus_1_per_window():
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(), "left")
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.5))
    masks = {}
    hooks = [
        model.model.vision_tower.layers[block].base_layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, block=block: masks.__setitem__(block, kwargs["attention_mask"]),
            with_kwargs=True,
        )
        for block in range(5)
    ]
    stts(**batch)
    for hook in hooks:
        hook.remove()
    assert masks[0] is None and masks[PRUNE_LAYER] is None
    bias = masks[PRUNE_LAYER + 1]
    frames, patches = batch["pixel_values_videos"].shape[:2]
    assert bias.shape == (frames, 1, 1, patches)
    bias = bias[:, 0, 0]
    units = unit_of_token(batch).view(frames, patches)
    for frame in range(frames):
        per_window = [bias[frame][units[frame] == unit] for unit in units[frame].unique()]
        assert all(bool((values == values[0]).all()) for values in per_window)  # one value per window
        if frame in (0, 4):  # each video's first frame: no bias
            assert bool((bias[frame] == 0).all())
        else:  # log of the score rescaled per frame to [e^-2, 1]
            torch.testing.assert_close(bias[frame].max(), torch.tensor(0.0))
            torch.testing.assert_close(bias[frame].min(), torch.tensor(-2.0))
    assert masks[PRUNE_LAYER + 2].shape[-2:] == (patches, patches)  # packed rows: the block-diagonal mask


# --------------------------------------------------------------------------------------------- the LLM
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_timestamps_and_frame_markers_are_never_pruned(padding_side):
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(answers=True), padding_side)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.5))
    seen, handle = base_model_inputs(model)
    out = stts(**batch)
    handle.remove()
    (inputs,) = seen
    ids, types, mask = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["attention_mask"].bool()
    for row, keep in enumerate(out.stts.keep_masks):
        before = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        after = ids[row][mask[row]]
        assert torch.equal(before[before != IMAGE_PATCH], after[after != IMAGE_PATCH])  # text, timestamps, markers
        starts = torch.nonzero(after == FRAME_START).squeeze(1)
        ends = torch.nonzero(after == FRAME_END).squeeze(1)
        assert len(starts) == len(ends) == keep.shape[0]
        for frame, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
            assert after[start + 1 : end].eq(IMAGE_PATCH).all() and end - start - 1 == int(keep[frame].sum())
    # The bidirectional block of image tokens is the kept patches and the frame markers, nothing else.
    expected_types = torch.isin(ids, torch.tensor(image_token_ids(model.config))) & mask
    assert torch.equal(types.bool(), expected_types)
    assert torch.isfinite(out.loss)


def test_training_requires_mm_token_type_ids_and_fails_before_the_vit():
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(answers=True), "right")
    without = {name: value for name, value in batch.items() if name != "mm_token_type_ids"}
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.5)).train()
    vit_calls = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda module, args: vit_calls.append(1))
    with pytest.raises(STTSInputError, match="mm_token_type_ids"):
        stts(**without)
    assert vit_calls == []
    with stts.disable_stts(), pytest.raises(ValueError, match="mm_token_type_ids"):
        stts(**without)  # the bare model refuses it too
    hook.remove()

    out = stts(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.stts.aux_loss > 0
    assert all(p.grad is not None for p in stts.scorer.parameters())


def test_images_next_to_videos_are_refused_like_the_bare_model():
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(), "left")
    batch["pixel_values"] = torch.zeros(1, *batch["pixel_values_videos"].shape[1:])
    with pytest.raises(ValueError, match="at the same time"):
        model(**batch)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    with pytest.raises(STTSInputError, match="images or videos"):
        stts(**batch)


def test_generate_with_nothing_pruned_equals_the_bare_generate():
    """Left padding, as for generation: positions and the image block continue exactly as the bare model's."""
    model = tiny_model()
    batch = build_molmo2_batch(model.config, two_videos(), "left")
    settings = dict(max_new_tokens=4, do_sample=False, eos_token_id=None)
    bare = model.generate(**batch, **settings)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, prune_ratio=0.0, method="similarity"))
    assert torch.equal(stts.generate(**batch, **settings), bare)
