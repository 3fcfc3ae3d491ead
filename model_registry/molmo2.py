"""Molmo2 (module layout of transformers 5.23), the STTS paper's own base model.

The SigLIP2-style ViT (`model.vision_tower.layers`) runs every frame of every video of a call as one batch
`(frames, patches, dim)`; the processor's `video_token_pooling` lists, for every LLM token, the flat patch indices of
its pooling window (3x3 in the released processor, -1 where a window at the grid edge overhangs it). The adapter
(`model.multi_modal_projector`) concatenates two inner ViT layers (`adapter_config.vision_feature_layer`), pools every
window with one cross-attention and projects it; the result is ADDED to the `<im_patch>` placeholder embeddings
(`image_token_id`; videos use the same id).

A pruning unit is one pooling window, so units at the grid edge have fewer patches than the others. Per frame the
processor writes the timestamp text, `<frame_start>`, one placeholder per window and `<frame_end>`: only the
placeholders are pruned, never the timestamps nor the frame markers. The LLM uses 1-D RoPE (the core's default
positions) and a bidirectional block over `mm_token_type_ids == 1`, which the core prunes with `input_ids`.

The adapter reads its layers in the original layout, so they are captured (scattered back by the core) and
`encode_videos` applies the adapter itself, mirroring `Molmo2Model.get_video_features` /
`Molmo2Model.get_image_features` of transformers 5.23, on the kept windows only. From 5.25 the processor indexes each
video's pooling windows into its own patches; `batch_pooling` turns them back into batch-wide indices.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import FrameTokens
from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout, scatter_kept
from stts_adapter.vit import FrameBatchViTEntry, block_of_hidden_state

# `Molmo2VideoProcessor.pooling_size` of transformers 5.23. The pooling window is a processor setting that the model
# config does not record; it only labels saved adapters (the layout reads the real window from the batch).
PROCESSOR_POOLING_SIZE = (3, 3)


@functools.cache
def pooling_indexes_each_video() -> bool:
    """Whether the installed transformers reads `video_token_pooling` per video (5.25 on: each video's windows index
    its own patches, `get_image_features` adds the earlier videos' patches) rather than over the whole batch's
    patches (5.23, 5.24). Read from `get_image_features`' signature, which gained `image_num_crops` with the change."""
    from transformers.models.molmo2.modeling_molmo2 import Molmo2Model

    return "image_num_crops" in inspect.signature(Molmo2Model.get_image_features).parameters


def batch_pooling(pooling: torch.Tensor, layout: VideoLayout, tokens_per_frame: int) -> torch.Tensor:
    """The processor's `video_token_pooling` as flat indices into all the call's patches `(frames *
    tokens_per_frame)`, whichever convention the installed transformers uses (`pooling_indexes_each_video`)."""
    pooling = pooling.long()
    if not pooling_indexes_each_video():
        return pooling
    patches_per_video = torch.tensor(layout.frames_per_video, device=pooling.device) * tokens_per_frame
    first_patch = patches_per_video.cumsum(0) - patches_per_video
    units = torch.tensor([frames * units for frames, units in zip(layout.frames_per_video, layout.units_per_frame)])
    offset = first_patch.repeat_interleave(units.to(pooling.device), output_size=pooling.shape[0])
    return torch.where(pooling >= 0, pooling + offset[:, None], pooling)


@register_architecture
class Molmo2Entry(FrameBatchViTEntry):
    name = "molmo2"
    model_types = ("molmo2",)
    vision_blocks = "model.vision_tower.layers"
    video_pixels = "pixel_values_videos"
    video_inputs = ("pixel_values_videos", "video_token_pooling", "video_grids")
    image_inputs = ("image_token_pooling", "image_grids")
    placeholder_token = "image_token_id"  # `Molmo2Model.get_placeholder_mask` fills `image_token_id` for videos too

    def patches_per_unit(self, model: nn.Module) -> int:
        return PROCESSOR_POOLING_SIZE[0] * PROCESSOR_POOLING_SIZE[1]  # the config does not record the pooling size

    def feature_layers(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> list[int]:
        """The `hidden_states` indices the adapter reads, in concatenation order: `get_image_features` reads
        `hidden_states[layer + 1 if layer >= 0 else layer]` for every `adapter_config.vision_feature_layer`."""
        return [layer + 1 if layer >= 0 else layer for layer in model.config.adapter_config.vision_feature_layer]

    # ------------------------------------------------------------------------------------------------ the ViT
    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        # Fail before the ViT runs on what the base model would refuse only after it.
        if inputs.get("pixel_values") is not None:
            raise STTSInputError(
                "Molmo2 takes images or videos in one call, not both (Molmo2Model.forward refuses pixel_values next "
                "to pixel_values_videos); pass them in separate calls."
            )
        if model.training and inputs.get("mm_token_type_ids") is None:
            raise STTSInputError(
                "Molmo2 needs `mm_token_type_ids` in training (its image tokens attend to each other "
                "bidirectionally); pass the one its processor returns."
            )
        grids = inputs["video_grids"].tolist()  # per video: (frames, pooled rows, pooled columns)
        return VideoLayout(
            frames_per_video=tuple(int(frames) for frames, _, _ in grids),
            units_per_frame=tuple(int(rows * columns) for _, rows, columns in grids),
            patches_per_unit=int(inputs["video_token_pooling"].shape[-1]),
        )

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> FrameTokens:
        """Units from the processor's pooling windows: patch `video_token_pooling[u, j]` (unless -1) is in unit `u`."""
        frames, tokens_per_frame = inputs["pixel_values_videos"].shape[:2]
        pooling = inputs["video_token_pooling"].long().cpu()
        if frames != layout.num_frames or pooling.shape[0] != layout.num_units:
            raise STTSInputError(
                f"pixel_values_videos holds {frames} frames and video_token_pooling {pooling.shape[0]} windows, but "
                f"video_grids describes {layout.num_frames} frames and {layout.num_units} windows; build the batch "
                "with the Molmo2 processor."
            )
        pooling = batch_pooling(pooling, layout, tokens_per_frame)
        valid = pooling >= 0
        unit = torch.arange(layout.num_units)[:, None].expand_as(pooling)
        patches, units = pooling[valid], unit[valid]
        # A unit must be a set of patches of its own frame, each patch in at most one unit: the processor's windows
        # partition every frame's grid. Anything else cannot be pruned unit by unit.
        if (
            not bool(valid.any(dim=1).all())
            or not bool((patches // tokens_per_frame == layout.frame_of_unit[units]).all())
            or bool((torch.bincount(patches, minlength=frames * tokens_per_frame) > 1).any())
        ):
            raise STTSInputError(
                "video_token_pooling is not a partition of every frame's patches into windows (empty window, window "
                "across frames or overlapping windows); build the batch with the Molmo2 processor."
            )
        token_unit = torch.full((frames * tokens_per_frame,), -1, dtype=torch.long)
        token_unit[patches] = units  # a patch outside every window (never made by the processor) is never pruned
        return FrameTokens(
            token_unit=token_unit.to(self.vision_device(model)),
            num_units=layout.num_units,
            tokens_per_frame=tokens_per_frame,
        )

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        # Molmo2Model.get_video_features -> get_image_features (transformers 5.23): the ViT, its feature layers
        # concatenated in config order, the adapter over the pooling windows, split per video. The layers come from
        # the pass (scattered back to the frames layout) and the adapter runs on the kept windows only: every window
        # is pooled on its own, so the result of a kept window is exactly what the full call gives it.
        core = model.model
        core.vision_tower(inputs["pixel_values_videos"])
        depth = model.config.vision_config.num_hidden_layers
        blocks = [block_of_hidden_state(layer, depth) for layer in self.feature_layers(model)]
        features = torch.cat([vision_pass.captured[block] for block in blocks], dim=-1)
        pooling = batch_pooling(inputs["video_token_pooling"], vision_pass.layout, features.shape[1])
        pooling = pooling.to(features.device)
        keep = vision_pass.keep.to(features.device)
        kept = core.multi_modal_projector(features, pooling[keep]).last_hidden_state
        return list(scatter_kept(kept, keep).split(list(vision_pass.layout.units_per_video)))
