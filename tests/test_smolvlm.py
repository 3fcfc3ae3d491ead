"""SmolVLM / SmolVLM2: what the conformance suite cannot see.

Videos and still images share `pixel_values` and the image placeholder token; only the rows marked in
`pixel_values_is_video` are videos. Still images are never pruned, the processor's frame text (intro, timestamps,
`<fake_token_around_image>`, `<global-img>`) always stays, a unit is one pixel-shuffle cell, and all-zero padding
images are not frames.
"""

import copy

import pytest
import torch
from transformers import SmolVLMForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.errors import STTSInputError
from stts_adapter.model_registry.smolvlm import IS_VIDEO, pixel_shuffle_units
from stts_adapter.processing import prepare_inputs
from stts_adapter.testing import Sample
from stts_adapter.testing.smolvlm import (
    FAKE_TOKEN_AROUND_IMAGE,
    GLOBAL_IMAGE_TOKEN,
    SMOLVLM,
    build_smolvlm_batch,
    smolvlm_tokens_per_image,
    tiny_smolvlm_config,
    tiny_smolvlm_processor,
)

PRUNE_LAYER = SMOLVLM.prune_layer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These models are tiny: on a shared 2-core machine, torch's intra-op threads cost ten times the work itself.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    return SmolVLMForConditionalGeneration(tiny_smolvlm_config()).eval()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def image(seed: int, size: int = 112) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25


def stts(model, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


def without_flag(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != IS_VIDEO}


# --------------------------------------------------------------------------------------------- videos vs images
def test_image_only_batches_are_the_bare_model_exactly(model):
    samples = [Sample(image=image(0), answer=[31, 32]), Sample(image=image(1), prefix=[1, 14], answer=[41])]
    batch = build_smolvlm_batch(model.config, samples, "left")
    assert IS_VIDEO not in batch  # the processor's output, unchanged
    bare = model(**batch)
    bare_ids = model.generate(**batch, max_new_tokens=3, do_sample=False)
    wrapped = stts(model, prune_ratio=0.5)

    out = wrapped(**batch)
    assert out.stts is None  # the pruning path never ran
    assert torch.equal(out.logits, bare.logits) and torch.equal(out.loss, bare.loss)
    assert torch.equal(wrapped.generate(**batch, max_new_tokens=3, do_sample=False), bare_ids)
    marked_none = wrapped(**batch, **{IS_VIDEO: torch.tensor([False, False])})  # rows marked as still images
    assert marked_none.stts is None and torch.equal(marked_none.logits, bare.logits)


def test_unmarked_videos_run_the_bare_model_with_a_warning_and_marked_ones_are_pruned(model):
    samples = [Sample(video=SMOLVLM.video(0)), Sample(video=SMOLVLM.video(1), prefix=[1, 14])]
    batch = build_smolvlm_batch(model.config, samples, "left")
    assert batch[IS_VIDEO].tolist() == [True, True]
    bare = model(**without_flag(batch))
    wrapped = stts(model, prune_ratio=0.5)

    with pytest.warns(UserWarning, match="prepare_inputs"):  # nothing in the processor's output says "video"
        unmarked = wrapped(**without_flag(batch))
    assert torch.equal(unmarked.logits, bare.logits)
    marked = wrapped(**batch)
    assert marked.stts.units_before == [64, 48] and marked.stts.units_after == [32, 24]
    real_after = batch["attention_mask"].sum(1) - torch.tensor([32, 24])  # only placeholders go
    assert marked.stts.attention_mask.sum(1).tolist() == real_after.tolist()
    assert marked.logits.shape[1] == int(real_after.max())


def test_still_images_next_to_videos_are_never_pruned(model):
    # Row 0: an image, then a video (two pixel_values rows); row 1: an image only.
    samples = [
        Sample(image=image(0), video=SMOLVLM.video(0), answer=[31, 32]),
        Sample(image=image(1), prefix=[1, 14], suffix=[25, 26], answer=[41]),
    ]
    batch = build_smolvlm_batch(model.config, samples, "right")
    assert batch[IS_VIDEO].tolist() == [False, True, False]
    bare = model(**without_flag(batch))
    wrapped = stts(model, prune_ratio=0.5)
    out = wrapped(**batch)

    assert out.stts.units_before == [64] and out.stts.units_after == [32]  # one video; images are no units
    per_image = smolvlm_tokens_per_image(model.config)
    keep, placeholders = out.stts.sequence.keep_tokens, batch["input_ids"] == model.config.image_token_id
    assert bool(keep[0][placeholders[0]][:per_image].all()) and bool(keep[1][placeholders[1]].all())
    assert int((~keep[0][placeholders[0]]).sum()) == 32  # only the video's placeholders go

    # Causal LLM: up to the end of row 0's image, and on all of row 1, the pruned model sees what the bare one sees.
    end_of_image = int(torch.nonzero(placeholders[0])[per_image - 1]) + 2  # the closing fake token included
    real_1 = batch["attention_mask"][1].bool()
    torch.testing.assert_close(out.logits[0, :end_of_image], bare.logits[0, :end_of_image], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1][: int(real_1.sum())], bare.logits[1][real_1], atol=1e-5, rtol=1e-5)

    unpruned = stts(wrapped.unload(), prune_ratio=0.0, method="similarity")(**batch)  # the pruning path, no pruning
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(unpruned.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unpruned.loss, bare.loss, atol=1e-5, rtol=1e-5)


def test_mixed_batch_generates_like_a_greedy_loop(model):
    samples = [Sample(image=image(0), video=SMOLVLM.video(0)), Sample(image=image(1), prefix=[1, 14])]
    batch = build_smolvlm_batch(model.config, samples, "left")
    wrapped = stts(model, prune_ratio=0.5)
    generated = wrapped.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    loop = dict(batch)
    for _ in range(3):
        next_token = wrapped(**loop).logits[:, -1].argmax(-1, keepdim=True)
        loop["input_ids"] = torch.cat([loop["input_ids"], next_token], 1)
        loop["attention_mask"] = torch.cat([loop["attention_mask"], torch.ones_like(next_token)], 1)
    assert torch.equal(generated, loop["input_ids"])


# --------------------------------------------------------------------------------------------- the LLM sequence
def test_frame_text_and_markers_are_never_pruned(model):
    samples = [Sample(video=SMOLVLM.video(0)), Sample(video=SMOLVLM.video(1), prefix=[1, 14])]
    batch = build_smolvlm_batch(model.config, samples, "left")
    out = stts(model, prune_ratio=0.5)(**batch)
    image_token = model.config.image_token_id

    for row, keep_mask in enumerate(out.stts.keep_masks):
        ids, real = batch["input_ids"][row], batch["attention_mask"][row].bool()
        kept = ids[out.stts.sequence.keep_tokens[row]]
        assert torch.equal(kept[kept != image_token], ids[real & (ids != image_token)])  # all text, in order
        # Frame by frame: <fake><global-img>, the frame's kept placeholders, <fake>.
        starts = torch.nonzero(kept == GLOBAL_IMAGE_TOKEN).squeeze(1)
        assert len(starts) == keep_mask.shape[0]
        for frame, start in enumerate(starts.tolist()):
            assert int(kept[start - 1]) == FAKE_TOKEN_AROUND_IMAGE
            n_kept = int(keep_mask[frame].sum())
            assert bool((kept[start + 1 : start + 1 + n_kept] == image_token).all())
            assert int(kept[start + 1 + n_kept]) == FAKE_TOKEN_AROUND_IMAGE


# --------------------------------------------------------------------------------------------- the ViT
def test_a_unit_is_one_pixel_shuffle_cell(model):
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size  # 16x16 patches, 4x4 cells
    units = pixel_shuffle_units(side, config.scale_factor)
    # Tag every patch with its unit: the model's own pixel shuffle must gather exactly one unit per output token, in
    # unit order (the placeholder order).
    tagged = units.float()[None, :, None].repeat(1, 1, 2)
    shuffled = model.model.connector.pixel_shuffle(tagged, config.scale_factor)[0]  # (cells, 2 * scale^2)
    assert torch.equal(shuffled, torch.arange(len(shuffled)).float()[:, None].expand_as(shuffled))

    # The key bias of block prune_layer + 1 is one value per cell (spread to its 16 patches), 0 on the first frame.
    batch = build_smolvlm_batch(config, [Sample(video=SMOLVLM.video(0))], "left")
    wrapped = stts(model, prune_ratio=0.5)
    biases = []
    block = wrapped.architecture.get_vision_blocks(model)[PRUNE_LAYER + 1].base_layer
    handle = block.register_forward_pre_hook(lambda module, args: biases.append(args[1]))
    out = wrapped(**batch)
    handle.remove()
    (bias,) = biases
    frames = bias.shape[0]
    per_cell = bias.view(frames, side * side)[:, torch.argsort(units, stable=True)].view(frames, -1, 16)
    assert torch.equal(per_cell, per_cell[..., :1].expand_as(per_cell))
    assert bool((bias[0] == 0).all()) and bool((bias[1:] < 0).any())
    assert out.stts.keep_masks[0].shape == (4, 16)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_video_frames_hand_the_vit_no_padding_mask(implementation):
    # Whether the core's FrameBatchViTEntry can add its key bias: the processor squares every frame, so the patch
    # mask is all ones and SmolVLM's create_bidirectional_mask returns None for the blocks.
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(tiny_smolvlm_config()).eval()
    model.set_attn_implementation(implementation)
    assert model.model.vision_model.config._attn_implementation == implementation
    samples = [Sample(video=SMOLVLM.video(0)), Sample(video=SMOLVLM.video(1), prefix=[1, 14])]
    batch = build_smolvlm_batch(model.config, samples, "right")
    masks = []
    handle = model.model.vision_model.encoder.layers[0].register_forward_pre_hook(
        lambda module, args: masks.append(args[1])
    )
    bare = model(**without_flag(batch))
    handle.remove()
    assert masks == [None]
    out = stts(model, prune_ratio=0.0, method="random")(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)


def test_padding_images_are_not_frames(model):
    # Row 1 holds 2 frames and 2 all-zero padding images (the processor pads rows to the longest video).
    samples = [Sample(video=SMOLVLM.video(0)), Sample(video=SMOLVLM.video(1)[:2], prefix=[1, 14])]
    batch = build_smolvlm_batch(model.config, samples, "left")
    assert batch["pixel_values"].shape[:2] == (2, 4) and not bool(batch["pixel_values"][1, 2:].any())
    out = stts(model, prune_ratio=0.5)(**batch)
    assert [mask.shape for mask in out.stts.keep_masks] == [(4, 16), (2, 16)]
    assert out.stts.units_after == [32, 16]


def test_inputs_stts_cannot_prune_are_refused_with_a_reason(model):
    wrapped = stts(model, prune_ratio=0.5)
    video = Sample(video=SMOLVLM.video(0))

    # A padded still image next to a video would give the ViT blocks a padding mask.
    padded = build_smolvlm_batch(model.config, [video, Sample(image=image(2, size=84))], "left")
    assert not bool(padded["pixel_attention_mask"][1, 0].all())
    with pytest.raises(STTSInputError, match="padded images"):
        wrapped(**padded)
    images = [Sample(image=image(2, size=84)), Sample(image=image(3))]  # padded to the largest, as the processor does
    alone = build_smolvlm_batch(model.config, images, "left")
    assert torch.equal(wrapped(**alone).logits, model(**alone).logits)  # on its own it is simply not pruned

    batch = build_smolvlm_batch(model.config, [video], "left")
    with pytest.raises(STTSInputError, match="one flag per row"):
        wrapped(**{**batch, IS_VIDEO: torch.tensor([True, True])})
    blank = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
    with pytest.raises(STTSInputError, match="holds no frame"):
        wrapped(**blank)


def test_the_video_flag_never_reaches_the_base_model():
    """generate rejects unknown keywords: the flag only STTS reads must be dropped, with STTS on or off."""
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(SMOLVLM.make_config()).eval()
    batch = SMOLVLM.build_batch(model.config, [Sample(video=SMOLVLM.video(0))], "left")
    expected = model.generate(**{k: v for k, v in batch.items() if k != IS_VIDEO}, max_new_tokens=3, do_sample=False)
    stts = apply_stts(model, STTSConfig(prune_layer=SMOLVLM.prune_layer))
    with stts.disable_stts():
        assert torch.equal(stts.generate(**batch, max_new_tokens=3, do_sample=False), expected)
    assert stts.generate(**batch, max_new_tokens=3, do_sample=False).shape == expected.shape


# --------------------------------------------------------------------------------------------- the real processor
def uint8_frames(video):
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_prepare_inputs_marks_images_as_images_and_refuses_what_the_processor_would_lose(model, recwarn):
    processor = tiny_smolvlm_processor(model.config)
    images = [[uint8_frames(image(1)[None])[0]], [uint8_frames(image(2, 84)[None])[0]]]
    inputs = prepare_inputs(processor, model, ["<image> What", "<image> describe"], images=images, return_tensors="pt")
    assert inputs[IS_VIDEO].tolist() == [False, False]
    bare = model(**without_flag(inputs))
    assert torch.equal(stts(model, prune_ratio=0.5)(**inputs).logits, bare.logits)
    assert not [w for w in recwarn if "STTS" in str(w.message)]
    with pytest.raises(STTSInputError, match="separate calls"):
        prepare_inputs(
            processor,
            model,
            ["<image> and <video> what"],
            images=[images[0]],
            videos=[uint8_frames(SMOLVLM.video(0))],
            return_tensors="pt",
        )
