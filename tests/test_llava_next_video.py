"""LLaVA-NeXT-Video specifics (tiny random config, CPU): a unit is one cell of the video resampler's 2x2 pooling, the
CLS token (dropped before the connector) stays in the ViT, any-resolution images are never pruned. The pruned tower
against the masked bare tower and the feature layers are in test_clip_video_towers.py (shared with Video-LLaVA);
what every family must do is in test_conformance.py (case `LLAVA_NEXT_VIDEO`)."""

import pytest
import torch
from transformers import LlavaNextVideoForConditionalGeneration
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.model_registry.llava_next_video import LlavaNextVideoEntry
from stts_adapter.selection import VideoLayout
from stts_adapter.testing import IMAGE_TOKEN, VIDEO_TOKEN, Sample, moving_square_video
from stts_adapter.testing.llava_next_video import (
    LLAVA_NEXT_VIDEO,
    build_llava_next_video_batch,
    tiny_llava_next_video_config,
)

PRUNE_LAYER = 1  # block 1 scored, block 2 biased, block 3 pruned and read (vision_feature_layer=-2), block 4 skipped
SIDE = 4  # 56 px frames, patch 14: 4x4 patches + CLS = 17 ViT tokens, 2x2 pooled tokens (units) per frame


@pytest.fixture(scope="module")
def fresh():
    """`fresh(**config)` -> the same tiny random model every time (eval mode)."""

    def build(**overrides):
        torch.manual_seed(0)
        return LlavaNextVideoForConditionalGeneration(tiny_llava_next_video_config(**overrides)).eval()

    return build


def video_samples(answers=False, image=False):
    first = Sample(video=LLAVA_NEXT_VIDEO.video(0), answer=[31, 32] if answers else None)
    if image:
        first.image = moving_square_video(1, 56, 56, color=(0.2, 0.3, 1.0), seed=5)[0]
    second = Sample(
        video=LLAVA_NEXT_VIDEO.video(1), prefix=[1, 14], suffix=[25, 26, 27], answer=[41] if answers else None
    )
    return [first, second]


def stts_of(model, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


# --------------------------------------------------------------------------------------------- the unit
@pytest.mark.parametrize("image_size", [56, 70])  # 4x4 patches, and 5x5 whose last row and column are not pooled
def test_units_are_exactly_the_cells_the_video_resampler_pools(fresh, image_size):
    model = fresh(image_size=image_size)
    side = image_size // 14
    entry = LlavaNextVideoEntry()
    layout = VideoLayout((2,), (entry.units_per_frame(model),), patches_per_unit=4)
    token_unit = entry.vision_tokens(model, {}, layout).token_unit.view(2, 1 + side * side)
    assert bool((token_unit[:, 0] == -1).all())  # CLS: never pruned

    # The model's own pooler: which patches feed each pooled token (a one-hot feature per patch).
    pooler = LlavaNextVideoPooler(model.config)
    pooled = pooler(torch.eye(side * side)[None])[0]  # (pooled tokens, patches)
    assert pooled.shape[0] == entry.units_per_frame(model) == (side // 2) ** 2
    for unit in range(pooled.shape[0]):
        feeds = torch.nonzero(pooled[unit]).squeeze(1)
        assert torch.equal(torch.nonzero(token_unit[0, 1:] == unit).squeeze(1), feeds)
        assert torch.equal(torch.nonzero(token_unit[1, 1:] == unit + pooled.shape[0]).squeeze(1), feeds)  # frame 1
    unpooled = pooled.sum(0) == 0
    assert bool((token_unit[:, 1:][:, unpooled] == -1).all()) and int(unpooled.sum()) == side * side - 4 * len(pooled)


# --------------------------------------------------------------------------------------------- the LLM side
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_the_llm_keeps_one_placeholder_per_kept_cell_and_no_cls(fresh, padding_side):
    model = fresh()
    batch = build_llava_next_video_batch(model.config, video_samples(), padding_side)
    out = stts_of(model, prune_ratio=0.5)(**batch)
    keep_tokens = out.stts.sequence.keep_tokens  # (batch, seq) in the unpruned layout
    for row, keep_mask in enumerate(out.stts.keep_masks):  # (frames, 4)
        placeholders = batch["input_ids"][row] == VIDEO_TOKEN
        assert int(placeholders.sum()) == keep_mask.numel()  # pooled tokens only: the CLS never reaches the LLM
        assert torch.equal(keep_tokens[row][placeholders], keep_mask.flatten())
        assert bool(keep_tokens[row][~placeholders & batch["attention_mask"][row].bool()].all())  # text stays
    assert sum(out.stts.units_after) < sum(out.stts.units_before)


# --------------------------------------------------------------------------------------------- images
def test_anyres_images_are_never_pruned_and_an_image_only_batch_is_the_base_model(fresh):
    """Images run through the same (wrapped) CLIP tower, outside any pruning pass."""
    model = fresh()
    mixed = build_llava_next_video_batch(model.config, video_samples(answers=True, image=True), "right")
    assert mixed["pixel_values"].shape == (1, 2, 3, 56, 56)  # base view + one grid view
    bare = model(**mixed)
    real = mixed["attention_mask"].bool()
    stts = stts_of(model, prune_ratio=0.0, method="similarity")
    nothing = stts(**mixed)  # through the pruning path, images encoded next to the videos
    torch.testing.assert_close(nothing.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    left = build_llava_next_video_batch(model.config, video_samples(image=True), "left")
    with torch.no_grad():
        expected = model.generate(**left, max_new_tokens=3, do_sample=False)  # STTS is inactive in a bare generate
    assert torch.equal(stts.generate(**left, max_new_tokens=3, do_sample=False), expected)

    stts.set_prune_ratio(0.5)
    out = stts(**mixed)
    images = mixed["input_ids"] == IMAGE_TOKEN
    assert int(images.sum()) == 2 * SIDE * SIDE + SIDE  # base view + grid view with one newline per row
    assert bool(out.stts.sequence.keep_tokens[images].all())
    assert out.stts.units_after[0] < out.stts.units_before[0]

    image = moving_square_video(1, 56, 56, seed=7)[0]
    image_only = build_llava_next_video_batch(model.config, [Sample(image=image, answer=[7])], "left")
    assert torch.equal(stts(**image_only).logits, model(**image_only).logits)
