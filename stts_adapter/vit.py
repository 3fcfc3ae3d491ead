"""The kinds of ViT the supported families use, as reusable `ArchitectureEntry` bases.

- `VarlenViTEntry`: all frames of a call in ONE packed sequence with `cu_seqlens` segments and rotary tables
  (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V). The key bias goes to block k+1's (wrapped) attention; after pruning,
  later blocks get re-measured segments and sliced rotary tables; the connector runs on kept units.
- `FrameBatchViTEntry`: frames as a batch `(frames, tokens, dim)` (SigLIP, CLIP, InternViT, Molmo2's ViT, timm).
  The key bias and, after pruning, the block-diagonal mask of the packed rows go in through the block's
  attention-mask argument; the layers the connector reads are scattered back to the frames layout for it.
- `VisionOnlyViTEntry`: a frames-as-batch ViT without a language model (timm classifiers, vision towers).

A family subclasses one of them and declares the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .errors import STTSInputError
from .packing import FrameTokens, PrunedVarlen, RowPacking, VarlenTokens
from .registry import KEY_BIAS_KWARG, ArchitectureEntry, VisionSpec
from .selection import VideoLayout

if TYPE_CHECKING:
    from .runtime import VisionPruningPass


def block_of_hidden_state(index: int, num_blocks: int) -> int:
    """The ViT block whose output is `hidden_states[index]` of a transformers vision model (whose
    `hidden_states[0]` is the embeddings)."""
    block = num_blocks + index if index < 0 else index - 1
    if not 0 <= block < num_blocks:
        raise ValueError(f"hidden_states[{index}] is not the output of a ViT block of this {num_blocks}-block model.")
    return block


class VarlenViTEntry(ArchitectureEntry):
    """A ViT that runs one packed sequence with `cu_seqlens` segments and a `position_embeddings` rotary table.

    Subclasses build the `VarlenTokens` (`vision_tokens`), implement `attention_with_key_bias` and say how the
    connector's output maps back to units (`run_connector`).
    """

    def biased_block_inputs(
        self, vision_pass: VisionPruningPass, args: tuple, kwargs: dict, token_bias: torch.Tensor
    ) -> tuple[tuple, dict]:
        return args, {**kwargs, KEY_BIAS_KWARG: token_bias}

    def prune_tokens(
        self, vision_pass: VisionPruningPass, block_output: torch.Tensor, block_kwargs: dict
    ) -> tuple[torch.Tensor, PrunedVarlen]:
        tokens: VarlenTokens = vision_pass.tokens
        pruned = tokens.prune(vision_pass.keep)
        kept = pruned.kept_tokens
        pruned.extras["position_embeddings"] = tuple(table[kept] for table in block_kwargs["position_embeddings"])
        return block_output[kept], pruned

    def pruned_block_inputs(
        self, vision_pass: VisionPruningPass, block_index: int, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        pruned: PrunedVarlen = vision_pass.pruned
        kwargs = dict(kwargs)
        kwargs["cu_seqlens"] = pruned.block_cu_seqlens(block_index)
        kwargs["position_embeddings"] = pruned.extras["position_embeddings"]
        if kwargs.get("max_seqlen") is not None:  # only flash attention asks for it
            kwargs["max_seqlen"] = pruned.block_max_seqlen(block_index)
        return args, kwargs


class FrameBatchViTEntry(ArchitectureEntry):
    """A ViT that runs frames as a batch and whose blocks take an additive attention mask.

    Declarations:
        mask_argument: name of the blocks' attention-mask argument (None: the blocks take none, see
            `mask_attention`).
        mask_position: its position when the model passes it positionally (None: always a keyword, or never
            passed, as with timm's `nn.Sequential` of blocks).
        mask_attention: for blocks without a mask argument, the attribute of a block's self-attention that takes
            `attention_mask`; it is wrapped to receive the mask from the running pass.
    """

    mask_argument: ClassVar[str | None] = "attention_mask"
    mask_position: ClassVar[int | None] = 1
    mask_attention: ClassVar[str | None] = None
    block_attention: ClassVar[str | None] = None  # the bias goes through the mask: no attention wrapper
    connector: ClassVar[str | None] = None  # the family applies its connector to the scattered-back layers

    def vision_config(self, model: nn.Module) -> Any:
        """The ViT's config (default: `config.vision_config` of a VLM)."""
        return model.config.vision_config

    def patches_per_unit(self, model: nn.Module) -> int:
        """*family* ViT patches that become one LLM token (the connector's pooling cell)."""
        raise NotImplementedError

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        """From the SigLIP / CLIP field names most vision configs use."""
        config = self.vision_config(model)
        return VisionSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            mlp_size=config.intermediate_size,
            num_blocks=config.num_hidden_layers,
            patches_per_unit=self.patches_per_unit(model),
        )

    def feature_layers(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> list[int]:
        """The `hidden_states` indices the connector reads: `config.vision_feature_layer` (an int or a list, the
        LLaVA convention; -1, the last block, when the config has none).

        Raises:
            STTSInputError: if the call asks for other layers than the config: which ViT layers are kept is decided
                from the config, before the ViT runs.
        """
        layers = getattr(getattr(model, "config", None), "vision_feature_layer", -1)
        layers = [layers] if isinstance(layers, int) else list(layers)
        requested = (inputs or {}).get("vision_feature_layer")
        if requested is not None:
            requested = [requested] if isinstance(requested, int) else list(requested)
            if requested != layers:
                raise STTSInputError(
                    f"This call passes vision_feature_layer={requested} but the model config says {layers}; STTS "
                    "decides which ViT layers to keep from the config. Set model.config.vision_feature_layer "
                    "instead of passing it to the call."
                )
        return layers

    def capture_blocks(self, model: nn.Module) -> tuple[int, ...]:
        """The ViT blocks whose outputs the connector reads (`feature_layers`)."""
        depth = self.vision_spec(model).num_blocks
        return tuple(block_of_hidden_state(layer, depth) for layer in self.feature_layers(model))

    def last_block(self, model: nn.Module) -> int:
        return max(self.capture_blocks(model))

    def validate_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        self.feature_layers(model, inputs)
        if self.mask_attention is not None and any(
            getattr(block, "gradient_checkpointing", False) and block.training
            for block in (getattr(b, "base_layer", b) for b in self.get_vision_blocks(model))
        ):
            # A checkpointed block recomputes its forward in the backward pass, outside this call: no mask then.
            raise STTSInputError(
                f"STTS cannot prune {type(model).__name__}'s ViT under gradient checkpointing (its blocks take no "
                "attention mask to recompute with); enable checkpointing on the language model only."
            )

    def _with_mask(
        self, vision_pass: VisionPruningPass, args: tuple, kwargs: dict, mask: torch.Tensor
    ) -> tuple[tuple, dict]:
        if self.mask_argument is None:  # the wrapped self-attention takes it from the pass
            vision_pass.attention_mask = mask
            return args, kwargs
        if self.mask_position is not None and len(args) > self.mask_position:
            args = (*args[: self.mask_position], mask, *args[self.mask_position + 1 :])
        else:
            kwargs = {**kwargs, self.mask_argument: mask}
        return args, kwargs

    def _mask_of(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        if self.mask_argument is None:
            return None
        if self.mask_position is not None and len(args) > self.mask_position:
            return args[self.mask_position]
        return kwargs.get(self.mask_argument)

    def biased_block_inputs(
        self, vision_pass: VisionPruningPass, args: tuple, kwargs: dict, token_bias: torch.Tensor
    ) -> tuple[tuple, dict]:
        tokens: FrameTokens = vision_pass.tokens
        hidden_states = args[0]
        bias = token_bias.to(hidden_states.dtype).view(-1, 1, 1, tokens.tokens_per_frame)  # (F, 1, 1, N)
        existing = self._mask_of(args, kwargs)
        if existing is not None:
            raise NotImplementedError(
                f"{type(self).__name__}: this call already passes an attention mask to the ViT blocks (padded "
                "frames?); STTS supports full frames only here."
            )
        return self._with_mask(vision_pass, args, kwargs, bias)

    def prune_tokens(
        self, vision_pass: VisionPruningPass, block_output: torch.Tensor, block_kwargs: dict
    ) -> tuple[torch.Tensor, RowPacking]:
        tokens: FrameTokens = vision_pass.tokens
        packing = tokens.prune(vision_pass.keep)
        packing.extras["attention_mask"] = packing.attention_mask(block_output.dtype)
        packing.extras["unpruned"] = block_output  # fill for the scattered-back layers
        return packing.pack(block_output), packing

    def pruned_block_inputs(
        self, vision_pass: VisionPruningPass, block_index: int, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        packing: RowPacking = vision_pass.pruned
        return self._with_mask(vision_pass, args, kwargs, packing.extras["attention_mask"])

    def unpack_output(self, vision_pass: VisionPruningPass, block_output: torch.Tensor) -> torch.Tensor:
        """A pruned block's packed output, back in the frames layout (pruned tokens hold block k+1's output)."""
        packing: RowPacking = vision_pass.pruned
        return packing.unpack(block_output, packing.extras["unpruned"])


class VisionOnlyViTEntry(FrameBatchViTEntry):
    """A ViT without a language model (a timm classifier, a transformers vision tower).

    A video is given as `(videos, frames, channels, height, width)` pixels, or as `(frames, channels, height,
    width)` with `frames_per_video`; 4-D pixels without it are images and run untouched. Frames run through the
    model as its usual batch; the last block's output is scattered back to the frames layout (pruned tokens hold
    their block k+1 features), so the model's own norm, pooling and head run unchanged, per frame.

    Declarations:
        pixel_argument: the forward argument holding the pixels.
        image_ndim: dimensions of the pixels of a batch of images (4 for `(images, 3, H, W)`); one more is a video.
        unit_side: side, in patches, of a square pruning unit (1: every patch is a unit).
    """

    has_language_model: ClassVar[bool] = False
    pixel_argument: ClassVar[str] = "pixel_values"
    frames_argument: ClassVar[str] = "frames_per_video"
    image_ndim: ClassVar[int] = 4
    unit_side: ClassVar[int] = 1

    def patches_per_unit(self, model: nn.Module) -> int:
        return self.unit_side**2

    def prefix_tokens(self, model: nn.Module) -> int:
        """*family* Tokens in front of the patches (CLS, registers), never pruned."""
        raise NotImplementedError

    def patch_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        """Patch rows and columns of every frame of the call (default: from the pixels' height and width)."""
        height, width = inputs[self.pixel_argument].shape[-2:]
        patch = self.patch_size(model)
        return height // patch, width // patch

    def patch_size(self, model: nn.Module) -> int:
        """*family* Side of a ViT patch in pixels."""
        raise NotImplementedError

    def has_videos(self, inputs: dict[str, Any]) -> bool:
        pixels = inputs.get(self.pixel_argument)
        if pixels is None:
            return False
        return pixels.dim() == self.image_ndim + 1 or inputs.get(self.frames_argument) is not None

    def frames_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, ...] | None]:
        """The base model's call arguments with videos flattened to frames, and the frames of every video (None
        when the pixels are plain images)."""
        inputs = dict(inputs)
        pixels = inputs.get(self.pixel_argument)
        frames = inputs.pop(self.frames_argument, None)
        if pixels is not None and pixels.dim() == self.image_ndim + 1:
            frames = (pixels.shape[1],) * pixels.shape[0]
            inputs[self.pixel_argument] = pixels.flatten(0, 1)
        if frames is not None:
            frames = tuple(int(f) for f in frames)
            if pixels is not None and sum(frames) != inputs[self.pixel_argument].shape[0]:
                raise ValueError(
                    f"{self.frames_argument}={list(frames)} adds up to {sum(frames)} frames but the pixels hold "
                    f"{inputs[self.pixel_argument].shape[0]}; give one count per video, in order."
                )
        return inputs, frames

    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        rows, columns = self.patch_grid(model, inputs)
        side = self.unit_side
        if rows % side or columns % side:
            raise STTSInputError(
                f"{type(self).__name__}.unit_side={side} does not divide the {rows}x{columns} patch grid of the "
                "frames; choose a frame size whose grid it divides."
            )
        frames = inputs[self.frames_argument]
        units = (rows // side) * (columns // side)
        return VideoLayout(tuple(frames), (units,) * len(frames), patches_per_unit=side * side)

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> FrameTokens:
        rows, columns = self.patch_grid(model, inputs)
        side, prefix = self.unit_side, self.prefix_tokens(model)
        unit_rows, unit_columns = torch.arange(rows) // side, torch.arange(columns) // side
        unit_in_frame = (unit_rows[:, None] * (columns // side) + unit_columns[None, :]).flatten()
        units_per_frame = layout.units_per_frame[0]
        first_unit_of_frame = torch.arange(layout.num_frames) * units_per_frame
        patch_units = first_unit_of_frame[:, None] + unit_in_frame[None, :]
        token_unit = torch.cat([torch.full((layout.num_frames, prefix), -1), patch_units], dim=1).flatten()
        return FrameTokens(
            token_unit=token_unit.to(self.vision_device(model)),
            num_units=layout.num_units,
            tokens_per_frame=prefix + rows * columns,
        )
