"""Video-LLaVA specifics (tiny random config, CPU): every frame's CLS token stays in the ViT and in the LLM, units are
single patches, images (their own tower) are never pruned. The pruned tower against the masked bare tower and the
feature layers are in test_clip_video_towers.py (shared with LLaVA-NeXT-Video); what every family must do is in
test_conformance.py (case `VIDEO_LLAVA`)."""

import pytest
import torch
from transformers import VideoLlavaForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import IMAGE_TOKEN, VIDEO_TOKEN, Sample, moving_square_video
from stts_adapter.testing.video_llava import (
    VIDEO_LLAVA,
    build_video_llava_batch,
    tiny_video_llava_config,
)

PRUNE_LAYER = 1  # block 1 scored, block 2 biased, block 3 pruned and read (vision_feature_layer=-2), block 4 skipped
SIDE = 4  # 56 px frames, patch 14: 4x4 patches, 16 units and 17 ViT tokens (CLS first) per frame


@pytest.fixture(scope="module")
def fresh():
    """`fresh(**config)` -> the same tiny random model every time (eval mode)."""

    def build(**overrides):
        torch.manual_seed(0)
        return VideoLlavaForConditionalGeneration(tiny_video_llava_config(**overrides)).eval()

    return build


def video_samples(answers=False, image=False):
    first = Sample(video=VIDEO_LLAVA.video(0), answer=[31, 32] if answers else None)
    if image:
        first.image = moving_square_video(1, 56, 56, color=(0.2, 0.3, 1.0), seed=5)[0]
    second = Sample(video=VIDEO_LLAVA.video(1), prefix=[1, 14], suffix=[25, 26, 27], answer=[41] if answers else None)
    return [first, second]


def stts_of(model, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


# --------------------------------------------------------------------------------------------- the LLM side
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_every_frame_keeps_its_cls_placeholder_and_loses_exactly_its_pruned_patches(fresh, padding_side):
    model = fresh()
    batch = build_video_llava_batch(model.config, video_samples(), padding_side)
    out = stts_of(model, prune_ratio=0.5)(**batch)
    keep_tokens = out.stts.sequence.keep_tokens  # (batch, seq) in the unpruned layout
    for row, keep_mask in enumerate(out.stts.keep_masks):  # (frames, 16)
        placeholders = batch["input_ids"][row] == VIDEO_TOKEN
        per_frame = keep_tokens[row][placeholders].view(keep_mask.shape[0], 1 + SIDE * SIDE)
        assert bool(per_frame[:, 0].all())  # the CLS placeholder of every frame stays
        assert torch.equal(per_frame[:, 1:], keep_mask)  # patch placeholders follow their units, in patch order
        assert bool(keep_tokens[row][~placeholders & batch["attention_mask"][row].bool()].all())  # text stays
    assert sum(out.stts.units_after) < sum(out.stts.units_before)


# --------------------------------------------------------------------------------------------- images
def test_images_are_never_pruned_and_an_image_only_batch_is_the_base_model(fresh):
    """Images run through their own tower (never wrapped), under the processor's default `pixel_values_images` key
    or the new `pixel_values` one."""
    model = fresh()
    samples = video_samples(answers=True, image=True)
    mixed = build_video_llava_batch(model.config, samples, "left")  # legacy key, as the 5.23 processor returns it
    assert mixed["pixel_values_images"].shape == (1, 3, 56, 56)
    bare = model(**mixed)
    stts = stts_of(model, prune_ratio=0.0, method="similarity")
    nothing = stts(**mixed)  # through the pruning path, images encoded next to the videos
    real = mixed["attention_mask"].bool()
    torch.testing.assert_close(nothing.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = model.generate(**mixed, max_new_tokens=3, do_sample=False)  # STTS is inactive in a bare generate
    assert torch.equal(stts.generate(**mixed, max_new_tokens=3, do_sample=False), expected)

    stts.set_prune_ratio(0.5)
    out = stts(**mixed)
    images = mixed["input_ids"] == IMAGE_TOKEN
    assert int(images.sum()) == SIDE * SIDE  # the processor's count: patches + CLS - CLS ("default")
    assert bool(out.stts.sequence.keep_tokens[images].all())
    assert out.stts.units_after[0] < out.stts.units_before[0]
    renamed = build_video_llava_batch(model.config, samples, "left", legacy_image_key=False)
    assert torch.equal(stts(**renamed).logits, out.logits)

    image = moving_square_video(1, 56, 56, seed=7)[0]
    image_only = build_video_llava_batch(model.config, [Sample(image=image, answer=[7])], "left")
    assert torch.equal(stts(**image_only).logits, model(**image_only).logits)
    assert all(type(layer).__name__ == "CLIPEncoderLayer" for layer in model.model.image_tower.encoder.layers)
