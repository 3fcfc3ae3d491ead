"""Qwen3-VL (module layout of transformers 5.23).

The ViT is Qwen2-VL's varlen ViT (one packed sequence, `cu_seqlens` per temporal slot, no windows, rotary
`position_embeddings`) with Qwen2.5-VL's config names; a unit is a 2x2 merge block (4 consecutive tokens, one LLM
token after `visual.merger`). DEEPSTACK: after each block of `deepstack_visual_indexes`, `deepstack_merger_list[i]`
merges that block's output the same way, and the LLM adds the result to its hidden states after decoder layer `i`
at the visual positions. Every DeepStack merger is wrapped as a connector too: one reading a block after the
pruning point runs on kept units, one reading an earlier block sees every token and runs unchanged; either way
`encode_videos` stacks the deepstack rows next to the main features, so the core prunes them identically.

The processor gives every temporal slot its own placeholder run between timestamp text
(`<t seconds><vision_start><video_pad>...<vision_end>`); positions are 3-D M-RoPE (interleaved) in which time only
advances through the text, so pruning leaves every kept token's position as it was.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass

from .qwen2_5_vl import Qwen2_5_VLEntry


@register_architecture
class Qwen3VLEntry(Qwen2_5_VLEntry):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    windowed = False  # Qwen2.5-VL's config names (`vision_spec`), Qwen2-VL's slot-only attention
    deepstack_mergers = "model.visual.deepstack_merger_list"

    def connector_paths(self, model: nn.Module) -> tuple[str, ...]:
        mergers = model.get_submodule(self.deepstack_mergers)
        return (self.connector, *(f"{self.deepstack_mergers}.{i}" for i in range(len(mergers))))

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        """Per video `(placeholders, 1 + deepstack layers, llm_hidden_size)`: the main features, then each DeepStack
        layer's, one row per unit, so that the core's placeholder pruning prunes all of them alike."""
        output = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
        per_layer = (output.pooler_output, *output.deepstack_features)  # each: one (units, D) tensor per video
        return [torch.stack(features, dim=1) for features in zip(*per_layer)]

    def video_encoder_output(self, video_features: list[torch.Tensor]) -> BaseModelOutputWithDeepstackFeatures:
        """The kept rows of `encode_videos`' stacks, split back into what `Qwen3VLModel.forward` reads."""
        layers = video_features[0].shape[1] if video_features else 1
        return BaseModelOutputWithDeepstackFeatures(
            pooler_output=tuple(f[:, 0] for f in video_features),
            deepstack_features=[tuple(f[:, i] for f in video_features) for i in range(1, layers)],
        )
