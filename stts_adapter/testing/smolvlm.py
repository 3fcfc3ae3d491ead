"""Tiny SmolVLM / SmolVLM2 models and batches laid out as the SmolVLM2 processor of transformers 5.23 lays them out."""

from __future__ import annotations

from typing import Any

import torch

import stts_adapter.model_registry.smolvlm  # noqa: F401  (registers the entry)
from stts_adapter.model_registry.smolvlm import IS_VIDEO

from .common import EOS, IMAGE_TOKEN, PAD, VIDEO_TOKEN, FamilyCase, Sample, tiny_text_config, tokenize
from .processors import tiny_tokenizer

# Special tokens of the SmolVLM2 tokenizer, inside the tiny vocabulary.
FAKE_TOKEN_AROUND_IMAGE = 993  # <fake_token_around_image>
GLOBAL_IMAGE_TOKEN = 994  # <global-img>
# "Words" of the processor's video text (intro and per-frame timestamps), inside the word range of the tiny vocabulary.
NEWLINE, COLON, FRAME_WORD, FROM_WORD = 100, 101, 102, 103
INTRO_WORDS = (110, 111, 112)  # "You are provided the following series of" ... "frames from a" ... "[H:MM:SS] video."
NUMBER_WORD = 200  # + n: num2words(n) of the frame count; also the video's duration in seconds
CLOCK_DIGITS = 300  # + value: the two-digit minutes and seconds of a timestamp


def tiny_smolvlm_config(image_size: int = 112, patch_size: int = 7, scale_factor: int = 4, depth: int = 5):
    """SmolVLM2 with a 5-block, 64-wide vision tower and a 2-layer, 64-wide Llama LLM.

    Args:
        image_size (`int`): frame side in pixels (the processor's `max_image_size`); with `patch_size` 7 the default
            gives a 16x16 patch grid.
        patch_size (`int`): ViT patch side.
        scale_factor (`int`): pixel-shuffle factor; 4, as in SmolVLM2-256M/500M, makes a unit of 4x4 patches and 16
            placeholders per frame.
        depth (`int`): ViT blocks.
    """
    from transformers import SmolVLMConfig

    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    return SmolVLMConfig(
        vision_config=vision,
        text_config=tiny_text_config(mrope=False, model_type="llama"),
        image_token_id=IMAGE_TOKEN,
        scale_factor=scale_factor,
        pad_token_id=PAD,  # 5.23 defaults this deprecated top-level id to 128002, outside the tiny vocabulary
    )


def smolvlm_tokens_per_image(config) -> int:
    """Placeholders per image or frame: the processor's `image_seq_len`, (grid / scale_factor) squared."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return (side // config.scale_factor) ** 2


def smolvlm_video_units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    """(frames, units per frame) the processor makes of a video: every frame is squared to the vision image size, one
    unit per pixel-shuffle cell."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return frames, (side // config.scale_factor) ** 2


def image_prompt(config) -> list[int]:
    """One unsplit image or frame: `<fake_token_around_image><global-img><image>*N<fake_token_around_image>`
    (`_prompt_single_image` of processing_smolvlm)."""
    placeholders = [config.image_token_id] * smolvlm_tokens_per_image(config)
    return [FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, *placeholders, FAKE_TOKEN_AROUND_IMAGE]


def video_prompt(config, frames: int, fps: int = 1) -> list[int]:
    """A video as `SmolVLMProcessor.replace_video_token` writes it: the intro ("You are provided the following series
    of {n} frames from a {duration} [H:MM:SS] video.\\n"), then per frame "\\nFrame from MM:SS:" and the frame's image
    prompt, then "\\n\\n". Frames are `1 / fps` seconds apart."""
    duration = frames // fps
    ids = [INTRO_WORDS[0], NUMBER_WORD + frames, INTRO_WORDS[1], NUMBER_WORD + duration, INTRO_WORDS[2], NEWLINE]
    for index in range(frames):
        minutes, seconds = divmod(index // fps, 60)
        ids += [NEWLINE, FRAME_WORD, FROM_WORD, CLOCK_DIGITS + minutes, COLON, CLOCK_DIGITS + seconds, COLON]
        ids += image_prompt(config)
    return [*ids, NEWLINE, NEWLINE]


def build_smolvlm_batch(
    config, samples: list[Sample], padding_side: str = "left", mark_videos: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenise samples and lay out their pixels the way the SmolVLM2 processor does.

    Every sample's image (placed before its video) becomes one row of `pixel_values` holding that image, and every
    video one row holding its frames; rows are padded with all-zero images to the longest, and smaller images are
    padded with zeros on the bottom and right, which `pixel_attention_mask` (int64) marks. The 5.23 processor makes
    image rows and video rows in separate calls (both use the key `pixel_values`); a batch holding both is what a
    collator makes of them.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".
        mark_videos (`bool`): add `pixel_values_is_video` (the one keyword STTS needs beyond the processor's output)
            when the batch holds a video.

    Returns:
        `dict`: the model's keyword arguments.
    """
    rows: list[torch.Tensor] = []
    row_is_video: list[bool] = []

    def placeholders(sample: Sample) -> list[int]:
        ids = []
        if sample.image is not None:
            rows.append(sample.image[None])
            row_is_video.append(False)
            ids += image_prompt(config)
        if sample.video is not None:
            rows.append(sample.video)
            row_is_video.append(True)
            ids += video_prompt(config, sample.video.shape[0])
        return ids

    batch = tokenize(samples, placeholders, padding_side, config.text_config.pad_token_id)
    if rows:
        images = max(len(row) for row in rows)
        height = max(row.shape[-2] for row in rows)
        width = max(row.shape[-1] for row in rows)
        pixel_values = torch.zeros(len(rows), images, 3, height, width)
        pixel_attention_mask = torch.zeros(len(rows), images, height, width, dtype=torch.int64)
        for index, row in enumerate(rows):
            pixel_values[index, : len(row), :, : row.shape[-2], : row.shape[-1]] = row
            pixel_attention_mask[index, : len(row), : row.shape[-2], : row.shape[-1]] = 1
        batch["pixel_values"] = pixel_values
        batch["pixel_attention_mask"] = pixel_attention_mask
        if mark_videos and any(row_is_video):
            batch[IS_VIDEO] = torch.tensor(row_is_video)
    return batch


def tiny_smolvlm_processor(config: Any) -> Any:
    """`SmolVLMProcessor` (with `SmolVLMImageProcessor` and `SmolVLMVideoProcessor`) for `tiny_smolvlm_config`:
    frames and images resized to the vision image size, no image splitting.

    Needs `num2words` (the processor spells out the frame count) and torchvision (the video processor).
    """
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tokenizer = tiny_tokenizer(
        {
            "<image>": config.image_token_id,
            "<video>": VIDEO_TOKEN,
            "<fake_token_around_image>": FAKE_TOKEN_AROUND_IMAGE,
            "<global-img>": GLOBAL_IMAGE_TOKEN,
            "<end_of_utterance>": EOS,
        }
    )
    side = {"longest_edge": config.vision_config.image_size}
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=side, max_image_size=side),
        tokenizer=tokenizer,
        image_seq_len=smolvlm_tokens_per_image(config),
    )


def _case() -> FamilyCase:
    from transformers import SmolVLMForConditionalGeneration

    return FamilyCase(
        name="smolvlm",
        model_class=SmolVLMForConditionalGeneration,
        make_config=tiny_smolvlm_config,
        build_batch=build_smolvlm_batch,
        videos=((4, 112, 112), (3, 112, 112)),  # frame counts may differ: the shorter row is padded with zero images
        units=smolvlm_video_units,
        vit_tokens_per_unit=16,
        make_processor=tiny_smolvlm_processor,
        processor_videos=((6, 64, 80), (4, 90, 60)),  # resized to the vision image size; the shorter row padded
    )


SMOLVLM = _case()
