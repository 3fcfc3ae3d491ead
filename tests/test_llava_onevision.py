"""LLaVA-OneVision specifics (tiny random config, CPU): the projector runs only on the patches the kept pooled tokens
read (on an even grid their own 2x2 cells; on an odd grid the bilinear weights reach across cells), and the kept pooled
tokens are the bare model's projector + `apply_pooling` of the whole restored grid. What every family must do is in
test_conformance.py (case `LLAVA_ONEVISION`)."""

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.model_registry import llava_onevision
from stts_adapter.testing import Sample
from stts_adapter.testing.llava_onevision import (
    LLAVA_ONEVISION,
    build_llava_onevision_batch,
    tiny_llava_onevision_config,
)
from stts_adapter.testing.video_llava import projector_inputs

PRUNE_LAYER = 1  # block 1 scored, block 2 biased, blocks 3-4 pruned; block 4 (vision_feature_layer=-1) restored
FRAMES = 4


@pytest.fixture(scope="module")
def fresh():
    """`fresh(image_size)` -> the same tiny random model every time (eval mode)."""

    def build(image_size=56):
        torch.manual_seed(0)
        return LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(image_size=image_size)).eval()

    return build


def padded_batch(model, answers=False):
    """Two different videos at the model's frame size, in one left-padded batch (their prompts differ in length)."""
    size = (FRAMES, model.config.vision_config.image_size, model.config.vision_config.image_size)
    samples = [
        Sample(video=LLAVA_ONEVISION.video(0, size=size), answer=[31, 32] if answers else None),
        Sample(
            video=LLAVA_ONEVISION.video(1, size=size), prefix=[1, 14], suffix=[25, 26], answer=[41] if answers else None
        ),
    ]
    return build_llava_onevision_batch(model.config, samples, "left")


def stts_of(model, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


def encode(stts, batch):
    """`encode_videos` inside a pruning pass, as `STTSModel` runs it: (per-video features, the pass)."""
    entry, model = stts.architecture, stts.transformers_model
    layout = entry.video_layout(model, batch)
    tokens = entry.vision_tokens(model, batch, layout)
    vision_pass = stts._vision_pass(
        layout, tokens, capture_blocks=entry.capture_blocks(model), last_block=entry.last_block(model)
    )
    with vision_pass.active():
        return entry.encode_videos(model, batch, vision_pass), vision_pass


@pytest.mark.parametrize("image_size", [56, 112, 70])  # 4x4 and 8x8 patches (even grids), 5x5 (odd)
def test_kept_pooled_tokens_equal_the_bare_projector_and_pooling(fresh, image_size):
    """The kept pooled tokens are what the bare model's projector + `apply_pooling` make of the whole restored grid
    (the layer the pass scattered back), and every video ends with the newline."""
    model = fresh(image_size)
    stts = stts_of(model, prune_ratio=0.5)
    with torch.no_grad():
        features, vision_pass = encode(stts, padded_batch(model))
        core = model.model
        selected = vision_pass.captured[stts.architecture.last_block(model)]  # (frames, patches, vision width)
        reference = core.apply_pooling(core.multi_modal_projector(selected)).reshape(2, -1, 64)
    keep = vision_pass.keep.view(2, -1)
    assert not bool(keep.all())
    for video, expected, kept in zip(features, reference, keep):
        assert video.shape == (len(kept) + 1, 64)
        torch.testing.assert_close(video[:-1][kept], expected[kept], atol=1e-5, rtol=1e-5)
        assert torch.equal(video[-1], core.image_newline)


def patches_read_by(model, keep_masks):
    """How many patches the kept pooled tokens depend on: those where the gradient of the bare `apply_pooling`'s kept
    tokens is non-zero."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    grids = torch.ones(len(keep_masks) * FRAMES, side * side, 1, requires_grad=True)
    pooled = model.model.apply_pooling(grids)  # (videos * frames, units_per_frame, 1)
    pooled[torch.cat([mask.view(FRAMES, -1) for mask in keep_masks])].sum().backward()
    return int((grids.grad != 0).sum())


@pytest.mark.parametrize(
    ("image_size", "ratio"),
    [(56, 0.5), (56, 0.0), (70, 0.5), (70, 0.0)],  # 4x4 patches (2x2 cells) and 5x5 (bilinear weights across cells)
)
def test_the_projector_sees_only_the_patches_the_kept_tokens_read(fresh, image_size, ratio):
    model = fresh(image_size)
    stts = stts_of(model, prune_ratio=ratio)
    outputs = []
    with torch.no_grad():
        (projected,) = projector_inputs(model, lambda: outputs.append(stts(**padded_batch(model))))
    report = outputs[0].stts
    rows = projected.shape[:-1].numel()
    patches = 2 * FRAMES * (image_size // 14) ** 2
    assert rows == patches_read_by(model, report.keep_masks)
    if ratio == 0:
        assert rows == patches
    elif image_size == 56:
        assert rows == 4 * sum(report.units_after) == patches // 2  # the kept 2x2 cells
    else:
        assert sum(report.units_after) < sum(report.units_before) and rows < patches


@pytest.mark.parametrize("image_size", [56, 70])
def test_training_equals_the_full_grid_path(fresh, monkeypatch, image_size):
    """A training step (the scorer learning through the key bias) gives the loss and the scorer gradients of the
    previous path, which projected every patch and pooled the whole restored grid."""

    def step(full_grid):
        model = fresh(image_size)
        if full_grid:
            pool = model.model.apply_pooling
            monkeypatch.setattr(
                llava_onevision, "project_kept_units", lambda projector, x, weights, keep: pool(projector(x))
            )
        stts = stts_of(model, prune_ratio=0.5).train()
        out = stts(**padded_batch(model, answers=True))
        out.loss.backward()
        return out.loss.detach(), [p.grad for p in stts.scorer.parameters()]

    loss, gradients = step(full_grid=False)
    expected_loss, expected_gradients = step(full_grid=True)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert all(g is not None and g.abs().sum() > 0 for g in gradients)
    for actual, expected in zip(gradients, expected_gradients):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
