"""GLM-4.1V specifics (tiny random config, CPU): the processor's video layout (frames use the IMAGE placeholder between
per-frame markers and timestamps), still images next to videos, the post-norm + downsample + merger connector, 3-D
positions, generation. What every family must do is in test_conformance.py."""

import functools
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import Glm4vForConditionalGeneration
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
from transformers.video_utils import VideoMetadata
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.errors import STTSInputError
from stts_adapter.testing import IMAGE_TOKEN, Sample, moving_square_video
from stts_adapter.testing.glm4v import (
    GLM4V,
    IMAGE_END,
    IMAGE_START,
    TIMESTAMP_DIGITS,
    VIDEO_END,
    VIDEO_START,
    build_glm4v_batch,
)

PRUNE_LAYER = GLM4V.prune_layer  # block 1 scored, block 2 biased, blocks 3.. on kept tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("glm4v")
    Glm4vForConditionalGeneration(GLM4V.make_config()).save_pretrained(directory)
    return directory


@pytest.fixture
def model(saved):
    return Glm4vForConditionalGeneration.from_pretrained(saved).eval()


def image():
    return moving_square_video(1, 56, 84, color=(0.2, 0.2, 0.9), seed=5)[0]


def mixed_samples():
    """A still image before a video, an image alone, a video alone: one image-token id for all of them."""
    return [
        Sample(video=GLM4V.video(0), image=image()),
        Sample(image=image(), prefix=[1, 9], suffix=[30, 31]),
        Sample(video=GLM4V.video(1), prefix=[1, 14], suffix=[25, 26, 27, 28]),
    ]


def expected_pruned(config, videos, ratio):
    pruned = []
    for frames, height, width in videos:
        slots, per_slot = GLM4V.units(config, frames, height, width)
        pruned.append(min(int(ratio * slots * per_slot), (slots - 1) * per_slot))
    return pruned


def bare_embeddings(model, batch):
    """The bare model's own input embeddings: images' and videos' features put where `mm_token_type_ids` (the
    processor's marking) says, from the bare encoders. transformers 5.23's Glm4vModel.forward cannot do this itself
    when a batch holds both: it fills images and videos through one mask (every image token)."""
    embeddings = model.get_input_embeddings()(batch["input_ids"])
    types = batch["mm_token_type_ids"]
    images = torch.cat(
        model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output
    )
    videos = model.get_video_features(
        batch["pixel_values_videos"], batch["video_grid_thw"], return_dict=True
    ).pooler_output
    embeddings[types == 1] = images
    embeddings[types == 2] = torch.cat(videos)
    return embeddings


# --------------------------------------------------------------------------------------------- processor layout
SPECIAL = {
    "<|begin_of_video|>": VIDEO_START,
    "<|end_of_video|>": VIDEO_END,
    "<|begin_of_image|>": IMAGE_START,
    "<|end_of_image|>": IMAGE_END,
    "<|image|>": IMAGE_TOKEN,
}


def processor_ids(text: str) -> list[int]:
    """A tokenizer for the processor's text: special tokens, and one token per timestamp digit."""
    return [SPECIAL[t] if t in SPECIAL else TIMESTAMP_DIGITS[int(t)] for t in re.findall(r"<\|\w+\|>|\d", text)]


@pytest.mark.parametrize(("frames", "fps"), [(8, 2.0), (7, 0.5)])  # 7 frames: padded to 4 slots, "12" seconds
def test_the_batch_builder_lays_a_video_out_as_glm4v_processor_does(frames, fps):
    config = GLM4V.make_config()
    video, still = moving_square_video(frames, 56, 84), image()
    batch = build_glm4v_batch(config, [Sample(video=video, image=still, prefix=[], suffix=[])], fps=fps)

    # Glm4vProcessor's own code (its sub-processors need torchvision, which these tests do without).
    processor = SimpleNamespace(
        image_token="<|image|>",
        video_processor=SimpleNamespace(merge_size=2),
        image_processor=SimpleNamespace(merge_size=2),
        image_token_id=IMAGE_TOKEN,
        video_start_id=VIDEO_START,
        video_end_id=VIDEO_END,
    )
    processor.replace_frame_token_id = functools.partial(Glm4vProcessor.replace_frame_token_id, processor)
    metadata = VideoMetadata(total_num_frames=frames, fps=fps, frames_indices=list(range(frames)))
    video_text = Glm4vProcessor.replace_video_token(
        processor, {"video_grid_thw": batch["video_grid_thw"], "video_metadata": [metadata]}, 0
    )
    image_text = Glm4vProcessor.replace_image_token(processor, {"image_grid_thw": batch["image_grid_thw"]}, 0)
    # Where the chat template puts them: <|begin_of_image|><|image|><|end_of_image|>, and likewise for the video.
    text = f"<|begin_of_image|>{image_text}<|end_of_image|><|begin_of_video|>{video_text}<|end_of_video|>"

    assert batch["input_ids"][0].tolist() == processor_ids(text)
    assert batch["mm_token_type_ids"].tolist() == Glm4vProcessor.create_mm_token_type_ids(
        processor, batch["input_ids"].tolist()
    )
    slots = -(-frames // 2)
    assert batch["video_grid_thw"].tolist() == [[slots, 4, 6]] and batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert batch["pixel_values_videos"].shape == (slots * 24, 3 * 2 * 14 * 14)
    assert batch["pixel_values"].shape == (24, 3 * 2 * 14 * 14)


# --------------------------------------------------------------------------------------------- the ViT
def test_key_bias_attention_with_zero_bias_equals_glm4v_attention(model):
    """The key-biased attention (Qwen2VLEntry's) is checked against Glm4vVisionAttention itself."""
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    visual = model.model.visual
    attention = visual.blocks[PRUNE_LAYER + 1].base_layer.attn.base_layer
    grid = torch.tensor([[1, 4, 6], [1, 4, 6], [1, 6, 4]])
    torch.manual_seed(0)
    hidden = torch.randn(int(grid.prod(-1).sum()), visual.config.hidden_size)
    position_embeddings = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, visual.spatial_merge_size))
    cu_seqlens = get_vision_cu_seqlens(grid)
    expected = attention(hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)

    def biased(bias):
        return stts.architecture.attention_with_key_bias(
            attention, hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, key_bias=bias
        )

    torch.testing.assert_close(biased(torch.zeros(hidden.shape[0])), expected, atol=1e-5, rtol=1e-5)
    bias = torch.zeros(hidden.shape[0])
    bias[:4] = -2.0  # the first unit of the first segment
    changed, first = biased(bias), int(cu_seqlens[1])
    assert not torch.allclose(changed[:first], expected[:first])
    torch.testing.assert_close(changed[first:], expected[first:], atol=1e-5, rtol=1e-5)


def test_norm_downsample_and_merger_run_on_kept_units_and_reach_the_llm_in_order(model):
    batch = build_glm4v_batch(model.config, mixed_samples())
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    visual = model.model.visual
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, (args[0], output))  # the first call: the videos' (images are encoded afterwards)

        return hook

    handles = [
        visual.post_layernorm.register_forward_hook(record("norm")),
        visual.downsample.register_forward_hook(record("downsample")),
        visual.merger.base_layer.register_forward_hook(record("merger")),
        model.model.language_model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.update(llm=kwargs), with_kwargs=True
        ),
    ]
    out = stts(**batch)
    for handle in handles:
        handle.remove()

    kept = sum(out.stts.units_after)
    assert kept < sum(out.stts.units_before)
    assert seen["norm"][0].shape[0] == 4 * kept  # 2x2 patches per unit
    assert seen["downsample"][0].shape[:1] + seen["downsample"][0].shape[2:] == (kept, 2, 2)
    assert seen["merger"][0].shape[0] == kept
    # The LLM receives the merger's rows of kept units at the video placeholders, in order, and the still images'
    # unpruned features at theirs.
    embeds, types = seen["llm"]["inputs_embeds"], out.stts.prune_like(batch["mm_token_type_ids"], 0)
    torch.testing.assert_close(embeds[types == 2], seen["merger"][1])
    images = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True).pooler_output
    torch.testing.assert_close(embeds[types == 1], torch.cat(images))


# --------------------------------------------------------------------------------------------- images and markers
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_only_video_frames_are_pruned_never_images_markers_or_timestamps(model, padding_side):
    batch = build_glm4v_batch(model.config, mixed_samples(), padding_side)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    entry = stts.architecture
    ids, types, real = batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"].bool()
    # Frames and still images share the image token; only the processor's video spans are placeholders.
    assert torch.equal(entry.placeholder_mask(model, ids), types == 2)
    assert bool(((ids == IMAGE_TOKEN) & (types == 1)).any())

    out = stts(**batch)
    keep = out.stts.keep_tokens
    expected = expected_pruned(model.config, GLM4V.videos, 0.5)
    assert [b - a for b, a in zip(out.stts.units_before, out.stts.units_after)] == expected
    assert bool(keep[real & (types != 2)].all())  # images, frame and video markers, timestamps, text
    assert int((keep & (types == 2)).sum()) == sum(out.stts.units_after)
    # Each row is its unpruned self minus the pruned frames' placeholders, in the same order, and no frame is left
    # without its markers and timestamp.
    pruned_ids, pruned_real = out.stts.prune_like(ids, -1), out.stts.attention_mask.bool()
    for row in range(ids.shape[0]):
        assert pruned_ids[row][pruned_real[row]].tolist() == ids[row][keep[row]].tolist()
        for token in (VIDEO_START, VIDEO_END, IMAGE_START, IMAGE_END, *TIMESTAMP_DIGITS):
            assert int((pruned_ids[row] == token).sum()) == int((ids[row] == token).sum())


def test_pruning_nothing_reproduces_the_bare_model_on_images_next_to_videos(model):
    # Right padding keeps the columns of the unpruned batch; fps 0.5 makes timestamps of two digits ("12").
    batch = build_glm4v_batch(model.config, mixed_samples(), "right", fps=0.5)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            batch["image_grid_thw"],
            batch["video_grid_thw"],
            batch["attention_mask"],
        )
        bare = model(
            inputs_embeds=bare_embeddings(model, batch),
            attention_mask=batch["attention_mask"],
            position_ids=positions,
        )
        out = apply_stts(model, STTSConfig(prune_ratio=0.0, prune_layer=PRUNE_LAYER, method="random"))(**batch)
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_kept_tokens_keep_their_original_3d_positions(model, padding_side):
    batch = build_glm4v_batch(model.config, mixed_samples(), padding_side)
    unpruned, _ = model.model.get_rope_index(
        batch["input_ids"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch["attention_mask"],
    )
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    # The seeded random baseline (deterministic in eval) drops whole last columns of some frames in this batch.
    out = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, method="random"))(**batch)
    handle.remove()
    positions, mask, keep = seen["position_ids"], seen["attention_mask"].bool(), out.stts.keep_tokens
    for row in range(keep.shape[0]):
        torch.testing.assert_close(positions[:, row][:, mask[row]], unpruned[:, row][:, keep[row]])
    # The text after a frame (its end marker) continues from the frame's largest position, also when the units
    # holding it were pruned.
    ids, checked = batch["input_ids"][0], 0
    for end in torch.nonzero(ids == IMAGE_END).squeeze(1)[1:].tolist():  # the first one closes the still image
        start = int(torch.nonzero(ids[:end] == IMAGE_START).max())
        frame, kept = unpruned[:, 0, start + 1 : end], keep[0, start + 1 : end]
        assert bool(keep[0, end]) and int(unpruned[0, 0, end]) == int(frame.max()) + 1
        checked += int(bool(kept.any()) and int(frame[:, kept].max()) < int(frame.max()))
    assert checked >= 1  # the batch does hold such a frame


def test_missing_mm_token_type_ids_is_refused_like_the_bare_model(model):
    batch = build_glm4v_batch(model.config, [Sample(video=moving_square_video(4, 56, 56))])
    del batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**batch)
    with pytest.raises(STTSInputError, match="mm_token_type_ids"):
        apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))(**batch)


# --------------------------------------------------------------------------------------------- generation
def test_generate_next_to_images_equals_a_greedy_loop_of_full_forwards(model):
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    samples = [Sample(video=GLM4V.video(1), image=image()), mixed_samples()[1]]  # the small video keeps it quick
    batch = build_glm4v_batch(model.config, samples, "left")
    generated = stts.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    loop = dict(batch)
    for _ in range(3):
        next_token = stts(**loop).logits[:, -1].argmax(-1, keepdim=True)
        loop["input_ids"] = torch.cat([loop["input_ids"], next_token], 1)
        loop["attention_mask"] = torch.cat([loop["attention_mask"], torch.ones_like(next_token)], 1)
        types = loop["mm_token_type_ids"]
        loop["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(next_token, dtype=types.dtype)], 1)
    assert torch.equal(generated, loop["input_ids"])


def test_beam_search_keeps_every_row_with_its_own_video(model):
    """Beam expansion splits pre-encoded features per row by placeholder counts: each row must get its own."""
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    samples = [mixed_samples()[0], mixed_samples()[2]]
    options = dict(max_new_tokens=3, num_beams=2, do_sample=False, eos_token_id=None)
    together = stts.generate(**build_glm4v_batch(model.config, samples, "left"), **options)
    for row, sample in enumerate(samples):
        alone = stts.generate(**build_glm4v_batch(model.config, [sample], "left"), **options)
        assert torch.equal(together[row, -3:], alone[0, -3:])
