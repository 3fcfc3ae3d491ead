"""InternVL specifics; tests/test_conformance.py (STTS_CONFORMANCE_CASES=stts_adapter.testing.internvl:INTERNVL) covers
the behaviour every family shares.

What is particular to InternVL: video frames and image tiles share `pixel_values` and `image_token_id` (the processor
merges them; `pixel_values_video_index` tells them apart), the frames carry text markers, the connector pixel-shuffles
2x2 cells, every frame has a CLS token, and the ViT layers take no attention mask.
"""

import copy
import threading

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.errors import STTSInputError
from stts_adapter.model_registry.internvl import PIXEL_VIDEO_INDEX
from stts_adapter.processing import prepare_inputs
from stts_adapter.testing import Sample
from stts_adapter.testing.internvl import (
    IMG_END,
    IMG_START,
    INTERNVL,
    build_internvl_batch,
    internvl_video_placeholders,
    tiny_internvl_config,
    tiny_internvl_processor,
)

PRUNE_LAYER = 1


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(tiny_internvl_config()).eval()


@pytest.fixture
def model(base):
    """A fresh copy of the tiny model (apply_stts wraps in place)."""
    return copy.deepcopy(base)


def stts_of(model, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


def image_and_video_samples():
    image = torch.rand(3, 112, 112, generator=torch.Generator().manual_seed(7))  # 2x2 crops + thumbnail: 5 tiles
    return [
        Sample(video=INTERNVL.video(0), image=image, answer=[31, 32]),
        Sample(video=INTERNVL.video(1), prefix=[1, 14], suffix=[25, 26, 27, 28], answer=[41]),
    ]


def image_run_mask(input_ids, row, context):
    """`(batch, seq)` True at the placeholders of the first `<img> ... </img>` run of `row` (its still image)."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    start = int(torch.nonzero(input_ids[row] == IMG_START)[0])
    end = int(torch.nonzero(input_ids[row] == IMG_END)[0])
    mask[row, start:end] = input_ids[row, start:end] == context
    return mask


def llm_inputs_embeds(model, **batch):
    """Run `model(**batch)`, returning the output and the `inputs_embeds` its language model received."""
    seen = {}

    def record(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        output = model(**batch)
    finally:
        handle.remove()
    return output, seen["embeds"]


# --------------------------------------------------------------------------------------------- never pruned
def test_image_tiles_are_never_pruned_and_reach_the_llm_as_in_the_bare_model(model):
    config = model.config
    batch = build_internvl_batch(config, image_and_video_samples(), "left")
    assert batch[PIXEL_VIDEO_INDEX].tolist() == [-1] * 5 + [0] * 4 + [1] * 3  # tiles, then each video's frames
    _, bare_embeds = llm_inputs_embeds(model, **batch)
    stts = stts_of(model, prune_ratio=0.5)
    out, embeds = llm_inputs_embeds(stts, **batch)

    assert out.stts.units_before == [4 * 4, 3 * 4]  # the videos' cells only: the 5 tiles are no units
    assert out.stts.units_after == [8, 6]
    image = image_run_mask(batch["input_ids"], 0, config.image_token_id)
    kept_image = out.stts.prune_like(image.long(), 0).bool()
    assert int(kept_image.sum()) == int(image.sum()) == 5 * 4
    torch.testing.assert_close(embeds[kept_image], bare_embeds[image], atol=1e-5, rtol=1e-5)


def test_frame_texts_and_image_markers_are_never_pruned(model):
    config = model.config
    batch = build_internvl_batch(config, image_and_video_samples(), "right")
    out = stts_of(model, prune_ratio=0.5)(**batch)
    pruned_ids = out.stts.prune_like(batch["input_ids"], -1)
    for row in range(2):
        before, after = batch["input_ids"][row], pruned_ids[row]
        before, after = before[batch["attention_mask"][row].bool()], after[out.stts.attention_mask[row].bool()]
        assert torch.equal(before[before != config.image_token_id], after[after != config.image_token_id])
        dropped = int((before == config.image_token_id).sum() - (after == config.image_token_id).sum())
        assert dropped == out.stts.units_before[row] - out.stts.units_after[row]
    assert int((pruned_ids == IMG_START).sum()) == int((batch["input_ids"] == IMG_START).sum()) == 1 + 4 + 3


# --------------------------------------------------------------------------------------------- units, CLS
@pytest.mark.parametrize(("image_size", "downsample_ratio"), [(56, 0.5), (112, 0.5), (112, 0.25)])
def test_a_unit_is_one_pixel_shuffle_cell_and_the_cls_token_is_in_none(image_size, downsample_ratio):
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(tiny_internvl_config(image_size, downsample_ratio=downsample_ratio))
    side = image_size // 14
    video = torch.rand(3, 3, image_size, image_size)
    batch = build_internvl_batch(model.config, [Sample(video=video)])
    stts = stts_of(model)
    entry = stts.architecture
    layout = entry.video_layout(model, batch)
    tokens = entry.vision_tokens(model, batch, layout)
    token_unit = tokens.token_unit.view(3, 1 + side * side)

    assert tokens.tokens_per_frame == 1 + side * side
    assert (token_unit[:, 0] == -1).all()  # CLS
    # The model's own pixel shuffle on a grid of patch numbers: token u is built from exactly the patches of unit u.
    grid = torch.arange(side * side, dtype=torch.float).view(1, side, side, 1)
    cells = model.model.pixel_shuffle(grid, scale_factor=downsample_ratio).reshape(-1, round(1 / downsample_ratio) ** 2)
    assert layout.units_per_frame == (len(cells),) and layout.patches_per_unit == cells.shape[1]
    for frame in range(3):
        for unit, patches in enumerate(cells.long()):
            members = torch.nonzero(token_unit[frame, 1:] == frame * len(cells) + unit).squeeze(1)
            assert members.tolist() == sorted(patches.tolist())


@pytest.mark.parametrize(
    "settings",
    [
        dict(vision_feature_layer=-2),  # an inner layer: later blocks are skipped while pruning
        dict(use_mean_pooling=False),  # the tower's final LayerNorm is real: get_image_features reads after it
        dict(image_size=112, downsample_ratio=0.25),  # 4x4 cells
    ],
    ids=["inner-layer", "final-norm", "4x4-cells"],
)
def test_pruning_nothing_matches_the_bare_model_for_other_connector_settings(settings):
    settings = dict(settings)
    top = {name: settings.pop(name) for name in ("vision_feature_layer",) if name in settings}
    torch.manual_seed(0)
    config = tiny_internvl_config(**settings)
    for name, value in top.items():
        setattr(config, name, value)
    model = InternVLForConditionalGeneration(config).eval()
    size = config.vision_config.image_size[0]
    samples = [Sample(video=torch.rand(3, 3, size, size), answer=[5]), Sample(video=torch.rand(2, 3, size, size))]
    batch = build_internvl_batch(config, samples, "right")
    bare = model(**batch)
    stts = stts_of(model, prune_ratio=0.0, method="random")
    out = stts(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, bare.loss, atol=1e-5, rtol=1e-5)
    stts.set_prune_ratio(0.5)
    pruned = stts(**batch)
    assert pruned.stts.units_before == [12, 8] and pruned.stts.units_after == [6, 4]
    assert torch.isfinite(pruned.logits).all()


# --------------------------------------------------------------------------------------------- videos
def test_two_videos_in_one_row_keep_their_own_budget_and_first_frame(model):
    config = model.config
    first, second = INTERNVL.video(0), INTERNVL.video(1)
    ids = [1, 11, *internvl_video_placeholders(config, 4), 12, 13, *internvl_video_placeholders(config, 3), 21]
    together = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.cat([first, second]),
        PIXEL_VIDEO_INDEX: torch.tensor([0] * 4 + [1] * 3),
    }
    stts = stts_of(model, prune_ratio=0.5)
    out = stts(**together)
    assert out.stts.units_before == [16, 12] and out.stts.units_after == [8, 6]
    assert all(bool(mask[0].all()) for mask in out.stts.keep_masks)
    alone = stts(**build_internvl_batch(config, [Sample(video=second)]))
    assert torch.equal(out.stts.keep_masks[1], alone.stts.keep_masks[0])  # the second video never pairs with the first


def test_without_a_video_row_the_call_is_the_bare_model(model):
    config = model.config
    batch = build_internvl_batch(config, image_and_video_samples(), "left")
    bare = model(**{k: v for k, v in batch.items() if k != PIXEL_VIDEO_INDEX})
    stts = stts_of(model, prune_ratio=0.5)
    with pytest.warns(UserWarning, match="prepare_inputs"):
        no_index = stts(**{k: v for k, v in batch.items() if k != PIXEL_VIDEO_INDEX})
    assert torch.equal(no_index.logits, bare.logits) and getattr(no_index, "stts", None) is None

    images = build_internvl_batch(config, [Sample(image=torch.rand(3, 56, 56)), Sample(image=torch.rand(3, 56, 112))])
    assert PIXEL_VIDEO_INDEX not in images
    expected = stts.unload().generate(**images, max_new_tokens=3, do_sample=False)
    stts = stts_of(model, prune_ratio=0.5)
    assert torch.equal(stts.generate(**images, max_new_tokens=3, do_sample=False), expected)


def test_an_inconsistent_video_index_is_refused(model):
    batch = build_internvl_batch(model.config, image_and_video_samples(), "left")
    stts = stts_of(model)
    with pytest.raises(STTSInputError, match="entries but pixel_values has"):
        stts(**{**batch, PIXEL_VIDEO_INDEX: batch[PIXEL_VIDEO_INDEX][:-1]})
    with pytest.raises(STTSInputError, match="consecutive rows"):
        stts(**{**batch, PIXEL_VIDEO_INDEX: torch.tensor([-1] * 5 + [0, 0, 1, 1, 0, 1, 1])})


# --------------------------------------------------------------------------------------------- layers without mask
def test_the_key_bias_and_the_packed_rows_mask_reach_the_layers_attention(model):
    config = model.config
    batch = build_internvl_batch(config, image_and_video_samples())
    stts = stts_of(model, prune_ratio=0.5)
    received = {}

    def record(index):
        def hook(module, args, kwargs, output):
            received[index] = kwargs.get("attention_mask")

        return hook

    layers = [block.base_layer for block in model.model.vision_tower.encoder.layer]
    attentions = [layer.attention.base_layer for layer in layers]  # inside the core's STTSMaskedAttention wrappers
    handles = [attention.register_forward_hook(record(i), with_kwargs=True) for i, attention in enumerate(attentions)]
    out = stts(**batch)
    for handle in handles:
        handle.remove()

    tokens = 1 + 4 * 4  # CLS + the 4x4 patches of a 56 px tile
    assert all(received[i] is None for i in range(PRUNE_LAYER + 1))  # scored layers run as in the bare model
    bias = received[PRUNE_LAYER + 1]  # (rows, 1, 1, tokens): one value per key
    assert bias.shape == (5 + 4 + 3, 1, 1, tokens)
    assert (bias[:5] == 0).all() and (bias[:, ..., 0] == 0).all()  # image tiles and CLS tokens are not biased
    assert (bias[5] == 0).all() and (bias[9] == 0).all()  # nor the videos' first frames
    assert bias[5:].min() >= -2 - 1e-5 and (bias[6:9] < 0).any()
    mask = received[PRUNE_LAYER + 2]  # (packed rows, 1, tokens, tokens), block diagonal per frame
    assert mask.shape[0] < 5 + 4 + 3 and mask.shape[1:] == (1, tokens, tokens)
    kept_tokens = 5 * tokens + sum(out.stts.units_after) * 4 + 7  # whole tiles; kept cells and CLS of every frame
    assert mask.shape[0] * tokens >= kept_tokens
    assert torch.equal(received[PRUNE_LAYER + 3], mask)
    same_block = mask[:, 0] == 0  # an equivalence relation per row: blocks of tokens that see each other only
    assert same_block.diagonal(dim1=1, dim2=2).all() and torch.equal(same_block, same_block.transpose(1, 2))
    assert torch.equal((same_block.float() @ same_block.float()) > 0, same_block)
    assert (~same_block).any()  # frames packed into one row do not see each other


def test_the_masks_reach_only_this_calls_attention(model):
    """The layers' attention takes the masks from the running pass (a context variable), not from module state: a
    bare call from another thread in the middle of a pruned call, and every call afterwards, is the bare model."""
    config = model.config
    image = torch.rand(1, 3, 56, 56)
    expected = model.model.get_image_features(image, return_dict=True).pooler_output
    stts = stts_of(model, prune_ratio=0.5)
    during = {}

    def bare_call_from_another_thread(module, args):
        if "started" in during:  # the other thread's own (bare) pass through this layer
            return
        during["started"] = True
        thread = threading.Thread(
            target=lambda: during.setdefault("image", model.model.get_image_features(image, return_dict=True))
        )
        thread.start()
        thread.join()

    handle = model.model.vision_tower.encoder.layer[PRUNE_LAYER + 2].base_layer.register_forward_pre_hook(
        bare_call_from_another_thread
    )
    try:
        out = stts(**build_internvl_batch(config, image_and_video_samples()))
    finally:
        handle.remove()
    assert out.stts.units_after != out.stts.units_before  # the call did prune
    torch.testing.assert_close(during["image"].pooler_output, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.model.get_image_features(image, return_dict=True).pooler_output, expected)


def test_gradient_checkpointing_of_the_pruned_vision_layers_is_refused(model):
    batch = build_internvl_batch(model.config, image_and_video_samples())
    stts = stts_of(model, prune_ratio=0.5).train()
    model.model.language_model.activation_checkpointing_enable()  # the language model alone: fine
    out = stts(**batch)
    out.loss.backward()
    assert all(p.grad is not None for p in stts.scorer.parameters())
    model.activation_checkpointing_enable()  # the vision layers too: their recompute would miss the masks
    with pytest.raises(STTSInputError, match="gradient checkpointing"):
        stts(**batch)
    assert all(
        len(layer.base_layer.attention._forward_pre_hooks) == 0 for layer in model.model.vision_tower.encoder.layer
    )


# --------------------------------------------------------------------------------------------- the real processor
def uint8_frames(video):
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_prepare_inputs_gives_every_row_of_the_real_processors_output_its_video(model):
    """An image of 3 tiles (2 crops + thumbnail) before a video in the first prompt, a video alone in the second:
    `InternVLProcessor` merges tiles and frames into one pixel_values in prompt order."""
    processor = tiny_internvl_processor(model.config)
    image = uint8_frames(torch.rand(1, 3, 60, 120, generator=torch.Generator().manual_seed(3)))[0]
    videos = [uint8_frames(INTERNVL.video(0)), uint8_frames(INTERNVL.video(1, size=(4, 56, 56)))]
    texts = ["<IMG_CONTEXT> describe <video> What happens", "<video> describe it"]
    inputs = prepare_inputs(processor, model, texts, images=[image], videos=videos, return_tensors="pt", padding=True)
    assert inputs[PIXEL_VIDEO_INDEX].tolist() == [-1] * 3 + [0] * 4 + [1] * 4
    report = stts_of(model, prune_ratio=0.5)(**inputs).stts
    assert report.units_before == [16, 16] and report.units_after == [8, 8]


def test_one_tile_images_raise_no_warning_and_are_the_bare_model(model, recwarn):
    processor = tiny_internvl_processor(model.config, max_patches=1)
    images = [uint8_frames(torch.rand(1, 3, 56, 56))[0], uint8_frames(torch.rand(1, 3, 40, 70))[0]]
    inputs = processor(text=["<IMG_CONTEXT> what", "<IMG_CONTEXT> describe"], images=images, return_tensors="pt")
    bare = model(**inputs)
    assert torch.equal(stts_of(model, prune_ratio=0.5)(**inputs).logits, bare.logits)
    assert not [w for w in recwarn if "STTS" in str(w.message)]
