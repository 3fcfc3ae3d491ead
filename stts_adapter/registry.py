"""The `ArchitectureEntry` contract and the registry of supported model families.

An entry describes one model family: how to recognise it, where its ViT blocks and connector live, what a pruning
unit is, and the few functions whose tensors differ between families. The core (`STTSModel`) owns everything else.
Entries register with the `@register_architecture` decorator; third-party packages can also expose entries in the
`stts_adapter.architectures` entry-point group, and `pip install` of the package is enough.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .errors import UnsupportedModelError
from .packing import TokenUnits
from .selection import VideoLayout

if TYPE_CHECKING:  # runtime imports this module
    from .packing import PrunedVarlen, RowPacking
    from .runtime import VisionPruningPass

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "stts_adapter.architectures"
KEY_BIAS_KWARG = "stts_key_bias"
"""Keyword under which a block wrapper hands the per-token key bias to the block's (wrapped) attention."""


@dataclass(frozen=True)
class VisionSpec:
    """The dimensions of a model's ViT that the scorer and the checks need.

    Args:
        hidden_size (`int`): width D of the ViT blocks.
        num_heads (`int`): attention heads of the ViT.
        mlp_size (`int`): MLP width of the ViT blocks (default scorer width).
        num_blocks (`int`): number of ViT blocks.
        patches_per_unit (`int`): ViT patches merged into one LLM token by the connector.
    """

    hidden_size: int
    num_heads: int
    mlp_size: int
    num_blocks: int
    patches_per_unit: int


class ArchitectureEntry:
    """How one model family is built, for the core to prune it.

    Subclass `stts_adapter.vit.VarlenViTEntry` or `stts_adapter.vit.FrameBatchViTEntry` (the two kinds of ViT),
    fill in the declarations, implement the methods marked *family*, and decorate the class with
    `@register_architecture`.

    Declarations (class attributes):
        name: registry key, e.g. "qwen2_5_vl".
        model_types: `config.model_type` values this entry handles.
        vision_blocks: dotted path, from the transformers model, of the ViT blocks (an `nn.ModuleList` or
            `nn.Sequential`).
        connector: dotted path (or a tuple of paths) of the module(s) that turn ViT tokens into LLM tokens, wrapped so
            that they run on kept units only (None: the family applies its connector itself in `encode_videos`).
        block_attention: attribute of a ViT block holding its self-attention, wrapped in block prune_layer + 1 to
            receive the key bias (None: the bias goes in another way, see `biased_block_inputs`).
        video_pixels: keyword argument of `forward` that carries the videos' pixels.
        video_inputs: every keyword argument about the videos; the core consumes them and does not pass them on.
        image_inputs: keyword arguments that `get_image_features` needs next to the pixels (images are never
            pruned, but they are encoded by the core when videos are).
        placeholder_token: attribute of the model config holding the video placeholder token id.
        stts_only_inputs: keyword arguments that only STTS reads (e.g. a flag telling videos from images where the
            model's own inputs cannot); they never reach the base model.
        has_language_model: False for a ViT alone (see `stts_adapter.vit.VisionOnlyViTEntry`).
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    vision_blocks: ClassVar[str]
    connector: ClassVar[str | tuple[str, ...] | None] = None
    block_attention: ClassVar[str | None] = None
    video_pixels: ClassVar[str] = "pixel_values_videos"
    video_inputs: ClassVar[tuple[str, ...]] = ("pixel_values_videos",)
    image_inputs: ClassVar[tuple[str, ...]] = ()
    placeholder_token: ClassVar[str] = "video_token_id"
    stts_only_inputs: ClassVar[tuple[str, ...]] = ()
    has_language_model: ClassVar[bool] = True

    # --------------------------------------------------------------------------------------------- recognition
    def matches(self, model: nn.Module) -> bool:
        """Whether `model` (a transformers model, never a PeftModel) belongs to this family."""
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        """*family* The ViT's dimensions."""
        raise NotImplementedError

    def model_name(self, model: nn.Module) -> str | None:
        """The base model's Hub id or path, recorded in the adapter (transformers: `config._name_or_path`)."""
        return getattr(getattr(model, "config", None), "_name_or_path", None) or None

    def load_base_model(self, name_or_path: str, model_class: str | None, **kwargs: Any) -> nn.Module:
        """Load the base model an adapter names (`AutoSTTSModel`): the transformers class it was saved with.

        Args:
            name_or_path (`str`): the adapter's `base_model_name_or_path`.
            model_class (`str`, *optional*): its `base_model_class`; None: `AutoModelForImageTextToText`.
            **kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `revision`, `token`, ...).
        """
        import transformers

        loader = getattr(transformers, model_class or "", None) or transformers.AutoModelForImageTextToText
        return loader.from_pretrained(name_or_path, **kwargs)

    def get_vision_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.vision_blocks)

    def connector_paths(self, model: nn.Module) -> tuple[str, ...]:
        """Dotted paths of the modules of `model` wrapped as connectors. Default: the `connector` declaration; a
        family whose connector count depends on the config (e.g. one DeepStack merger per tapped ViT block)
        overrides it."""
        return (self.connector,) if isinstance(self.connector, str) else tuple(self.connector or ())

    def vision_device(self, model: nn.Module) -> torch.device:
        """Device of the ViT blocks (with a device map it may differ from the LLM's)."""
        return next(self.get_vision_blocks(model).parameters()).device

    # ------------------------------------------------------------------------------------------------ the ViT
    def has_videos(self, inputs: dict[str, Any]) -> bool:
        return inputs.get(self.video_pixels) is not None

    def unmarked_videos(self, model: nn.Module, inputs: dict[str, Any]) -> str | None:
        """Why a batch that `has_videos` found no video in may still hold some, for a family whose processor output
        does not tell video frames from still images (None: it holds none, or they are marked). The core warns once
        with it, so STTS never silently runs the bare model on a video. Default: None (videos have their own
        inputs)."""
        return None

    def mark_videos(
        self, processor: Any, inputs: dict[str, Any], text: list[str], images: bool, videos: bool
    ) -> dict[str, Any]:
        """The processor's output plus what this family needs to find its videos in it (see `prepare_inputs`).

        Args:
            processor: the model's transformers processor that made `inputs`.
            inputs (`dict`): its output.
            text (`list[str]`): the prompts it was given, before it expanded their image and video tokens.
            images, videos (`bool`): whether it was given images, videos.

        Returns:
            `dict`: `inputs` (default: unchanged, the processor's output already tells videos apart).
        """
        return inputs

    def validate_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> None:
        """Refuse, with an error that says what to do, a call this family cannot prune (runs before anything else)."""

    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        """*family* Frames and units of every video in the batch, in placeholder order."""
        raise NotImplementedError

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> TokenUnits:
        """*family* The unit (and attention segment) of every ViT token: `VarlenTokens` or `FrameTokens`."""
        raise NotImplementedError

    def capture_blocks(self, model: nn.Module) -> tuple[int, ...]:
        """ViT blocks whose outputs `encode_videos` reads from the pass (`vision_pass.captured`)."""
        return ()

    def last_block(self, model: nn.Module) -> int | None:
        """Last ViT block anything reads; later blocks are skipped while pruning (None: run them all)."""
        return None

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        """*family* Run the model's video encoder; the wrappers prune inside it.

        Returns:
            `list[torch.Tensor]`: per video, `(placeholders, llm_hidden_size)` LLM-ready features in placeholder
            order (the rows of pruned units are unused).
        """
        raise NotImplementedError

    def video_placeholder_units(self, layout: VideoLayout) -> list[torch.Tensor]:
        """Per group of placeholders, in their order in the batch (a video, by default), the unit each placeholder
        shows: its index in the layout, or -1 for a placeholder that shows no unit (a frame's CLS, a newline, an image
        tile sharing the token), which is never pruned. Default: one placeholder per unit, in layout order.

        Returns:
            `list[torch.Tensor]`: long tensors, one per group.
        """
        return list(torch.arange(layout.num_units).split(list(layout.units_per_video)))

    def video_placeholder_keep(self, layout: VideoLayout, keep_units: torch.Tensor) -> list[torch.Tensor]:
        """Per group of placeholders (`video_placeholder_units`), which stay: a unit's placeholder follows its unit,
        the others always stay."""
        return [_placeholder_keep(units, keep_units) for units in self.video_placeholder_units(layout)]

    def biased_block_inputs(self, vision_pass: VisionPruningPass, args: tuple, kwargs: dict, token_bias: torch.Tensor):
        """*family* The arguments of block prune_layer + 1 with the key bias (one value per ViT token) added."""
        raise NotImplementedError

    def attention_with_key_bias(self, attention: nn.Module, *args: Any, key_bias: torch.Tensor, **kwargs: Any):
        """*family* (when `block_attention` is set) The block's self-attention with an additive bias on the key
        side, one value per ViT token (0 = unchanged), broadcast over heads and queries."""
        raise NotImplementedError

    def prune_tokens(
        self, vision_pass: VisionPruningPass, block_output: Any, block_kwargs: dict
    ) -> tuple[torch.Tensor, PrunedVarlen | RowPacking]:
        """*family* Remove the pruned units' tokens after block prune_layer + 1.

        Returns:
            `(hidden_states, pruned)`: what the next block receives, and the state later steps need.
        """
        raise NotImplementedError

    def pruned_block_inputs(
        self, vision_pass: VisionPruningPass, block_index: int, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """*family* Arguments of a block that runs on kept tokens only (segments, masks, rotary tables...)."""
        raise NotImplementedError

    def unpack_output(self, vision_pass: VisionPruningPass, block_output: torch.Tensor) -> torch.Tensor:
        """*family* A pruned block's output in the unpruned layout (for `capture_blocks`)."""
        raise NotImplementedError

    def run_connector(self, vision_pass: VisionPruningPass, connector: nn.Module, args: tuple, kwargs: dict) -> Any:
        """*family* Run the wrapped connector on kept tokens, returning what the model expects from it. (A connector
        that reads a block before the pruning point sees every token and runs unchanged, without this call.)"""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ the LLM
    def placeholder_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """`(batch, seq)` True at the video placeholder tokens, in the order the model fills them."""
        return input_ids == getattr(model.config, self.placeholder_token)

    def original_positions(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Position ids of the UNPRUNED sequence, as the base model would compute them (`(..., batch, seq)`).

        Default, for 1-D RoPE language models: the given `position_ids`, else each row's count of real tokens so
        far (padding-aware, as `generate` numbers them).
        """
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs["input_ids"])
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def video_encoder_output(self, video_features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        """The kept video features in the form the model's forward reads from `mm_encoder_outputs["video"]`.
        Default: a tuple with one `(kept_placeholders, D)` tensor per video."""
        return BaseModelOutputWithPooling(pooler_output=tuple(video_features))

    def language_model_inputs(
        self, model: nn.Module, inputs: dict[str, Any], video_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """The base model's keyword arguments, with the kept video features in place of the videos.

        The default uses the transformers 5 `mm_encoder_outputs` protocol. Images are encoded here, unpruned,
        because a forward refuses pixel values next to `mm_encoder_outputs`.

        Args:
            model: the transformers model.
            inputs (`dict`): the call's keyword arguments, per-token tensors already pruned, videos removed.
            video_features (`list[torch.Tensor]`): one `(kept_placeholders, llm_hidden_size)` tensor per video.

        Returns:
            `dict`: keyword arguments for the base model's `forward` / `generate`.
        """
        inputs = dict(inputs)
        encoder_outputs = dict(inputs.pop("mm_encoder_outputs", None) or {})
        pixel_values = inputs.pop("pixel_values", None)
        if pixel_values is not None and encoder_outputs.get("image") is None:
            image_kwargs = {name: inputs[name] for name in self.image_inputs if inputs.get(name) is not None}
            encoder_outputs["image"] = model.get_image_features(pixel_values, return_dict=True, **image_kwargs)
        encoder_outputs["video"] = self.video_encoder_output(video_features)
        inputs["mm_encoder_outputs"] = encoder_outputs
        return inputs


_REGISTRY: dict[str, ArchitectureEntry] = {}
_BUILTINS_LOADED = False


def register_architecture(entry: type[ArchitectureEntry] | ArchitectureEntry):
    """Register a model family. Use as a class decorator or call with an instance.

    Args:
        entry: an `ArchitectureEntry` subclass (instantiated without arguments) or instance.

    Returns:
        The argument, unchanged, so it works as a decorator.

    Example:
        ```python
        >>> from stts_adapter import register_architecture
        >>> from stts_adapter.registry import ArchitectureEntry
        >>> @register_architecture
        ... class MyVLMEntry(ArchitectureEntry):
        ...     name = "my_vlm"
        ...     model_types = ("my_vlm",)
        ...     vision_blocks = "model.vision_tower.blocks"
        ```
    """
    instance = entry() if isinstance(entry, type) else entry
    if not isinstance(instance, ArchitectureEntry):
        raise TypeError(f"register_architecture expects an ArchitectureEntry subclass, got {entry!r}.")
    for attribute in ("name", "model_types", "vision_blocks"):
        if not hasattr(instance, attribute):
            raise TypeError(f"{type(instance).__name__} must declare `{attribute}` to be registered.")
    if instance.name in _REGISTRY and type(_REGISTRY[instance.name]) is not type(instance):
        logger.warning("Architecture %r is registered again; the new entry replaces the old one.", instance.name)
    _REGISTRY[instance.name] = instance
    return entry


def _load_builtin_and_plugin_entries() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    importlib.import_module("stts_adapter.model_registry")
    for plugin in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_architecture(plugin.load())
        except Exception as exc:  # a broken plugin must not break the built-in families
            logger.warning("Could not load STTS architecture plugin %r: %s", plugin.name, exc)


def supported_architectures() -> list[str]:
    """Names of all registered model families (built-in and plugins), sorted."""
    _load_builtin_and_plugin_entries()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> ArchitectureEntry:
    """The entry registered under `name`."""
    _load_builtin_and_plugin_entries()
    if name not in _REGISTRY:
        raise UnsupportedModelError(
            f"No STTS architecture is registered as {name!r}. Supported: {', '.join(supported_architectures())}."
        )
    return _REGISTRY[name]


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT `PeftModel` (or `model` itself when it is not one)."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def find_architecture(model: nn.Module) -> ArchitectureEntry:
    """The entry that recognises `model`.

    Raises:
        UnsupportedModelError: listing the supported families and how to add one.
    """
    _load_builtin_and_plugin_entries()
    for entry in _REGISTRY.values():
        if entry.matches(model):
            return entry
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise UnsupportedModelError(
        f"STTS does not support {type(model).__name__} (model_type={model_type!r}). Supported architectures: "
        f"{', '.join(supported_architectures())}. To add one, subclass stts_adapter.registry.ArchitectureEntry and "
        "register it with stts_adapter.register_architecture (see 'Adding an architecture' in the README)."
    )


def _placeholder_keep(units: torch.Tensor, keep_units: torch.Tensor) -> torch.Tensor:
    """`(placeholders,)` bool: the keep of the unit each placeholder shows, True for those that show none."""
    units = units.to(keep_units.device)
    keep = torch.ones(units.shape, dtype=torch.bool, device=keep_units.device)
    shows_unit = units >= 0
    keep[shows_unit] = keep_units[units[shows_unit]]
    return keep
