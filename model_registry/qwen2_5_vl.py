"""Qwen2-VL and Qwen2.5-VL (module layout of transformers 5.23).

The ViT runs all videos of a call as ONE packed sequence. A pruning unit is a 2x2 spatial-merge block, i.e. 4
consecutive tokens and one LLM token after `visual.merger`; the method's "frame" is a temporal slot (2 frames).
Attention segments are the slots (`cu_seqlens`) and, in Qwen2.5-VL, windows of units (`cu_window_seqlens`) in all
blocks but `fullatt_block_indexes`; Qwen2.5-VL permutes units into window order before the blocks and back after
the merger. The LLM uses 3-D M-RoPE positions from `get_rope_index`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import VarlenTokens, segment_ids, varlen_attention
from stts_adapter.registry import VisionSpec, register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout, scatter_kept
from stts_adapter.vit import VarlenViTEntry


@register_architecture
class Qwen2VLEntry(VarlenViTEntry):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    vision_blocks = "model.visual.blocks"
    connector = "model.visual.merger"
    block_attention = "attn"
    video_inputs = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    image_inputs = ("image_grid_thw",)
    windowed = False

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        config = model.config.vision_config
        return VisionSpec(
            hidden_size=config.embed_dim,
            num_heads=config.num_heads,
            mlp_size=int(config.embed_dim * config.mlp_ratio),
            num_blocks=config.depth,
            patches_per_unit=config.spatial_merge_size**2,
        )

    # ------------------------------------------------------------------------------------------------ the ViT
    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        merge = model.config.vision_config.spatial_merge_size
        grid = inputs["video_grid_thw"].tolist()
        for index, (_, rows, columns) in enumerate(grid):
            if rows % merge or columns % merge:
                raise STTSInputError(
                    f"video_grid_thw[{index}] = {grid[index]} has {rows}x{columns} patches per frame, which the "
                    f"{merge}x{merge} merge block (spatial_merge_size) does not divide: pass the grid the processor "
                    "made for these pixels."
                )
        return VideoLayout(
            frames_per_video=tuple(t for t, _, _ in grid),
            units_per_frame=tuple((h // merge) * (w // merge) for _, h, w in grid),
            patches_per_unit=merge * merge,
        )

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> VarlenTokens:
        config = model.config.vision_config
        device = self.vision_device(model)
        unit_of_slot, segments = torch.arange(layout.num_units), {}
        if self.windowed:
            unit_of_slot, cu_window_seqlens = get_vision_window_index(
                inputs["video_grid_thw"].cpu(), config.spatial_merge_size, config.window_size, config.patch_size
            )
            segments["window"] = segment_ids(cu_window_seqlens)
        token_unit = unit_of_slot.repeat_interleave(layout.patches_per_unit)  # (N,) in ViT (window) order
        segments["frame"] = layout.frame_of_unit[token_unit]
        full_attention = set(getattr(config, "fullatt_block_indexes", ())) if self.windowed else None
        block_segments = tuple(
            "frame" if full_attention is None or i in full_attention else "window" for i in range(config.depth)
        )
        return VarlenTokens(
            token_unit=token_unit.to(device),
            num_units=layout.num_units,
            segments={kind: ids.to(device) for kind, ids in segments.items()},
            block_segments=block_segments,
        )

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        output = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        return list(output.pooler_output)

    def attention_with_key_bias(
        self,
        attention: nn.Module,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        *,
        key_bias: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Qwen2_5_VLVisionAttention.forward / VisionAttention.forward of transformers 5.23, with the key bias.
        length = hidden_states.shape[0]
        qkv = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3)
        query, key, value = qkv.unbind(0)  # (N, heads, head_dim) each
        query, key = apply_rotary_pos_emb_vision(query, key, *position_embeddings)
        output = varlen_attention(query, key, value, cu_seqlens, key_bias=key_bias, scale=attention.scaling)
        return attention.proj(output.reshape(length, -1))

    def run_connector(
        self, vision_pass: VisionPruningPass, connector: nn.Module, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        merged = connector(*args, **kwargs)  # (kept_units, D), units in ViT (window) order
        # The model reorders the merger's output by unit afterwards: hand back every unit slot (pruned ones zero).
        unit_of_slot = vision_pass.tokens.token_unit[:: vision_pass.layout.patches_per_unit]
        return scatter_kept(merged, vision_pass.keep[unit_of_slot])

    # ------------------------------------------------------------------------------------------------ the LLM
    def original_positions(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        input_ids = inputs["input_ids"]
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:  # what the processor would have passed; without it positions fall back to 1-D
            config = model.config
            token_types = (input_ids == config.image_token_id).int() + 2 * (input_ids == config.video_token_id).int()
        positions, _ = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=inputs.get("attention_mask"),
        )
        return positions  # (3, batch, seq)


@register_architecture
class Qwen2_5_VLEntry(Qwen2VLEntry):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    windowed = True

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        config = model.config.vision_config
        return VisionSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            mlp_size=config.intermediate_size,
            num_blocks=config.depth,
            patches_per_unit=config.spatial_merge_size**2,
        )
