"""Tiny Video-LLaVA models and batches laid out as `VideoLlavaProcessor` (transformers 5.23) lays them out."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

import stts_adapter.model_registry.video_llava  # noqa: F401

from ..scorer import soft_key_bias
from ..selection import VideoLayout
from .common import IMAGE_TOKEN, VIDEO_TOKEN, FamilyCase, Sample, tiny_text_config, tokenize_stacked_videos
from .processors import tiny_tokenizer

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, VideoLlavaConfig

    from ..model import STTSModel
    from ..report import STTSReport


def tiny_clip_vision_config(image_size: int = 56, depth: int = 5, **overrides) -> dict:
    """A 64-wide, 4-head CLIP vision tower of `depth` blocks on `image_size` px frames (patch 14).

    Args:
        image_size (`int`): frame side in pixels (56: a 4x4 patch grid).
        depth (`int`): ViT blocks. With the LLaVA default `vision_feature_layer=-2` the connector reads block
            `depth - 2`; 5 blocks leave blocks 3 (pruned, read) and 4 (skipped) after prune_layer 1.
        **overrides: other fields of the vision config.
    """
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
    )
    vision.update(overrides)
    return vision


def tiny_video_llava_config(
    image_size: int = 56, depth: int = 5, vision_feature_layer: int | list[int] = -2, **vision_overrides
) -> VideoLlavaConfig:
    """Video-LLaVA with two 5-block, 64-wide CLIP towers (video and image) and a 2-layer Llama LLM.

    Args:
        image_size (`int`): frame side in pixels (patch 14).
        depth (`int`): ViT blocks.
        vision_feature_layer (`int` or `list[int]`): the `hidden_states` the connector reads (LLaVA default -2).
        **vision_overrides: other fields of the vision config.
    """
    from transformers import VideoLlavaConfig

    return VideoLlavaConfig(
        vision_config=tiny_clip_vision_config(image_size, depth, **vision_overrides),
        text_config=tiny_text_config(mrope=False, model_type="llama"),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=vision_feature_layer,
    )


def video_llava_video_tokens_per_frame(config: PretrainedConfig) -> int:
    """Video placeholders per frame as `VideoLlavaProcessor.replace_video_token` counts them: every patch plus the
    CLS token (`num_additional_image_tokens=1`; the feature-select strategy does not apply to videos)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def video_llava_image_tokens(config: PretrainedConfig) -> int:
    """Image placeholders as `VideoLlavaProcessor.replace_image_token` counts them: patches + 1 CLS, minus the CLS
    again under the "default" strategy."""
    vision = config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens


def build_video_llava_batch(
    config: PretrainedConfig, samples: list[Sample], padding_side: str = "left", legacy_image_key: bool = True
) -> dict[str, torch.Tensor]:
    """Tokenise samples the way `VideoLlavaProcessor` does.

    Each video becomes `frames x (patches + 1)` `<video>` placeholders (CLS first in every frame, as the model fills
    them), each image `patches` `<image>` placeholders (placed before the video). Videos are stacked into one
    `pixel_values_videos` tensor `(videos, frames, 3, size, size)`, so all videos of a batch have the same frame count
    and are `image_size` square (the processor crops them so); images go in one `(images, 3, size, size)` tensor,
    under `pixel_values_images` as the 5.23 image processor returns them by default (`return_legacy_image_output=True`),
    or under `pixel_values` (its non-legacy key, the model's new argument name).

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".
        legacy_image_key (`bool`): images under `pixel_values_images` (the processor's default) or `pixel_values`.

    Returns:
        `dict`: the model's keyword arguments.
    """
    batch, images = tokenize_stacked_videos(
        config, samples, padding_side, video_llava_image_tokens(config), video_llava_video_tokens_per_frame(config)
    )
    if images:
        batch["pixel_values_images" if legacy_image_key else "pixel_values"] = torch.stack(images)
    return batch


def video_llava_video_units(config: PretrainedConfig, frames: int, height: int, width: int) -> tuple[int, int]:
    """(frames, units per frame) of a video: one unit per patch; the CLS placeholder of a frame is not a unit."""
    patch = config.vision_config.patch_size
    return frames, (height // patch) * (width // patch)


def tiny_video_llava_processor(config: Any) -> Any:
    """`VideoLlavaProcessor` (with `VideoLlavaImageProcessor` and `VideoLlavaVideoProcessor`) for
    `tiny_video_llava_config`: frames resized and center-cropped to the vision image size, a CLS placeholder per
    frame."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.VideoLlavaProcessor(
        image_processor=transformers.VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size=square),
        video_processor=transformers.VideoLlavaVideoProcessor(
            size={"shortest_edge": side}, crop_size=square, do_sample_frames=False
        ),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )


def _case() -> FamilyCase:
    from transformers import VideoLlavaForConditionalGeneration

    return FamilyCase(
        name="video_llava",
        model_class=VideoLlavaForConditionalGeneration,
        make_config=tiny_video_llava_config,
        build_batch=build_video_llava_batch,
        videos=((4, 56, 56), (4, 56, 56)),  # one (videos, frames, ...) tensor: same frames and size
        make_processor=tiny_video_llava_processor,
        processor_videos=((4, 64, 80), (4, 90, 60)),  # resized and cropped to the image size; one frame count
        units=video_llava_video_units,
        vit_tokens_per_unit=1,
    )


VIDEO_LLAVA = _case()


# ------------------------------------------------------------------------------------------------ test oracles
def projector_inputs(model: nn.Module, call: Callable[[], Any]) -> list[torch.Tensor]:
    """What `model.model.multi_modal_projector` receives while `call()` runs (one tensor per projector call)."""
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        call()
    finally:
        handle.remove()
    return [x.detach() for x in seen]


def frame_key_bias(stts: STTSModel, report: STTSReport, patches_per_unit: int) -> torch.Tensor:
    """The soft key bias block prune_layer + 1 must add to each unit, from the report's logits: `soft_key_bias` over
    the batch's videos, 0 in the frames that keep every unit (only frames that lose units are biased).

    Args:
        stts (`STTSModel`): the model that produced `report` (its `bias_min`).
        report (`STTSReport`): `out.stts` of a pruning call on a video-only batch.
        patches_per_unit (`int`): ViT patches per unit.

    Returns:
        `torch.Tensor` of shape `(frames, units_per_frame)`: the bias of every unit of every frame, videos in order.
    """
    keep_units = torch.cat(report.keep_masks)  # (frames, units)
    frames = tuple(len(mask) for mask in report.keep_masks)
    layout = VideoLayout(frames, tuple(keep_units.shape[1] for _ in frames), patches_per_unit)
    logits = torch.cat([x.flatten() for x in report.logits])
    unit_bias = soft_key_bias(logits, layout.frame_of_unit, layout.is_first_frame, stts.stts_config.bias_min)
    return torch.where(keep_units.all(1, keepdim=True), 0.0, unit_bias.view(keep_units.shape))


def masked_tower_reference(
    stts: STTSModel, batch: dict, keep_token: torch.Tensor, token_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The projector's video input in the BARE model when ViT blocks prune_layer + 2.. cannot attend to the pruned
    tokens (and block prune_layer + 1 adds `token_bias` to its keys): what pruning must reproduce at the kept tokens.

    Built from the model's own modules: the CLIP blocks get an additive attention mask through their
    `attention_mask` argument, nothing of stts_adapter runs (STTS is disabled).

    Args:
        stts (`STTSModel`): a Video-LLaVA or LLaVA-NeXT-Video model with STTS applied.
        batch (`dict`): video-only inputs (the video tower's blocks must see only the videos' frames).
        keep_token (`torch.Tensor` of shape `(frames, tokens_per_frame)`, bool): the tokens that stay, CLS included.
        token_bias (`torch.Tensor` of shape `(frames, tokens_per_frame)`, *optional*): key bias of block
            prune_layer + 1.

    Returns:
        `torch.Tensor`: the projector's input, in the bare model's layout.
    """
    model = stts.transformers_model
    blocks = stts.architecture.get_vision_blocks(model)
    k = stts.stts_config.prune_layer
    frames, tokens = keep_token.shape
    hidden_dtype = next(blocks.parameters()).dtype
    blocked = torch.zeros(frames, 1, tokens, tokens, dtype=hidden_dtype)
    blocked = blocked.masked_fill(~keep_token[:, None, None, :], torch.finfo(hidden_dtype).min)

    def with_mask(mask):
        return lambda module, args: (args[0], mask, *args[2:])

    handles = [blocks[i].base_layer.register_forward_pre_hook(with_mask(blocked)) for i in range(k + 2, len(blocks))]
    if token_bias is not None:
        bias = token_bias.to(hidden_dtype).view(frames, 1, 1, tokens)
        handles.append(blocks[k + 1].base_layer.register_forward_pre_hook(with_mask(bias)))
    try:
        with stts.disable_stts(), torch.no_grad():
            (reference,) = projector_inputs(model, lambda: model(**batch))
    finally:
        for handle in handles:
            handle.remove()
    return reference
