"""Import the STTS scorer of an official Molmo2 checkpoint (the paper's released models) as an STTS adapter.

The official code (`olmo/nn/temporal_image_vit.py` in allenai/molmo2) keeps the scorer inside the ViT as
`vision_backbone.image_vit.transformer.temporal_token_scorer`:

- `patch_token_pooler.{wq,wk,wv,wo}`: multi-head attention whose query is the mean of a pooling window's patches
  (keys and values may have fewer heads: grouped-query attention);
- `mlp.{w1,w2,w3}`: 2D -> H -> H -> 1 with SiLU, then a sigmoid.

This library's scorer is the same function: `pool.attention` (`nn.MultiheadAttention`, its `in_proj` = wq, wk, wv
stacked, key/value heads repeated for grouped-query attention) and `mlp.0`, `mlp.2`, `mlp.4`. What differs, and so
makes the imported scores differ from the official ones:

- Windows at the edge of the patch grid, which hold fewer than 9 patches: the official pooler averages and attends
  over the missing patches as zero vectors; this library leaves them out. Full windows score identically.
- The official scorer reads the ViT's residual stream as it is: the adapter is written with
  `scorer_input_norm=False`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from safetensors import safe_open

from .config import STTSConfig
from .errors import AdapterLoadError

OFFICIAL_SCORER = "vision_backbone.image_vit.transformer.temporal_token_scorer."
OFFICIAL_BLOCK = re.compile(r"^vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.")
POOLER, MLP = "patch_token_pooler.", "mlp."
# Official MLP layer -> index in this library's `nn.Sequential` (Linear, SiLU, Linear, SiLU, Linear).
MLP_LAYERS = {"w1": 0, "w2": 2, "w3": 4}
MOLMO2_PATCHES_PER_UNIT = 9  # the released processor's 3x3 pooling windows


def read_molmo2_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int | None]:
    """The official scorer's tensors (names relative to `temporal_token_scorer.`) and the number of ViT blocks the
    checkpoint holds (None when it holds none), reading no other tensor.

    Args:
        path: a `.safetensors` file, or a folder of them (a sharded checkpoint).

    Raises:
        AdapterLoadError: if there is no safetensors file or no scorer in it.
    """
    path = os.fspath(path)
    files = _safetensors_files(path)
    if not files:
        raise AdapterLoadError(f"{path} is neither a .safetensors file nor a folder holding some.")
    scorer: dict[str, torch.Tensor] = {}
    blocks: set[int] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.startswith(OFFICIAL_SCORER):
                    scorer[key[len(OFFICIAL_SCORER) :]] = f.get_tensor(key)
                elif match := OFFICIAL_BLOCK.match(key):
                    blocks.add(int(match.group(1)))
    if not scorer:
        raise AdapterLoadError(
            f"{path} holds no tensor under {OFFICIAL_SCORER!r}: it is not a Molmo2 checkpoint trained with STTS."
        )
    return scorer, (max(blocks) + 1 if blocks else None)


def molmo2_scorer_state_dict(
    official: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> dict[str, torch.Tensor]:
    """The official scorer's tensors as this library's `STTSScorer` state dict.

    Args:
        official (`Mapping[str, torch.Tensor]`): `patch_token_pooler.{wq,wk,wv,wo}.{weight,bias}` and
            `mlp.{w1,w2,w3}.{weight,bias}`.
        num_heads (`int`, *optional*): the pooler's query heads; needed only when keys and values have fewer heads
            (grouped-query attention), to repeat them.

    Returns:
        `dict[str, torch.Tensor]`: `pool.attention.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}` and
        `mlp.{0,2,4}.{weight,bias}`.

    Raises:
        AdapterLoadError: if a tensor is missing or the shapes do not make the scorer.
    """
    expected = [f"{POOLER}{w}.{p}" for w in ("wq", "wk", "wv", "wo") for p in ("weight", "bias")]
    expected += [f"{MLP}{w}.{p}" for w in MLP_LAYERS for p in ("weight", "bias")]
    missing = [name for name in expected if name not in official]
    if missing:
        raise AdapterLoadError(f"The official scorer is missing {missing}; is the checkpoint complete?")
    query = official[f"{POOLER}wq.weight"]
    key_value_size = official[f"{POOLER}wk.weight"].shape[0]
    repeat = 1
    if key_value_size != query.shape[0]:
        if num_heads is None or query.shape[0] % num_heads:
            raise AdapterLoadError(
                f"The official pooler's keys and values have {key_value_size} channels for {query.shape[0]} query "
                "channels (grouped-query attention): pass num_heads, the pooler's query heads (the ViT's heads)."
            )
        head_dim = query.shape[0] // num_heads
        repeat = query.shape[0] // key_value_size

    def heads_repeated(tensor: torch.Tensor) -> torch.Tensor:
        if repeat == 1:
            return tensor
        return tensor.unflatten(0, (-1, head_dim)).repeat_interleave(repeat, dim=0).flatten(0, 1)

    state = {
        "pool.attention.in_proj_weight": torch.cat(
            [query, *(heads_repeated(official[f"{POOLER}{w}.weight"]) for w in ("wk", "wv"))]
        ),
        "pool.attention.in_proj_bias": torch.cat(
            [official[f"{POOLER}wq.bias"], *(heads_repeated(official[f"{POOLER}{w}.bias"]) for w in ("wk", "wv"))]
        ),
        "pool.attention.out_proj.weight": official[f"{POOLER}wo.weight"],
        "pool.attention.out_proj.bias": official[f"{POOLER}wo.bias"],
    }
    for name, index in MLP_LAYERS.items():
        for parameter in ("weight", "bias"):
            state[f"mlp.{index}.{parameter}"] = official[f"{MLP}{name}.{parameter}"]
    width = state["pool.attention.out_proj.weight"].shape[0]
    if state["mlp.0.weight"].shape[1] != 2 * width or state["mlp.4.weight"].shape[0] != 1:
        raise AdapterLoadError(
            f"The official scorer's MLP takes {state['mlp.0.weight'].shape[1]} inputs and gives "
            f"{state['mlp.4.weight'].shape[0]} outputs; a scorer on a {width}-wide ViT takes {2 * width} and gives 1."
        )
    return {name: tensor.float().contiguous() for name, tensor in state.items()}


def molmo2_adapter_config(
    state: Mapping[str, torch.Tensor],
    num_vision_blocks: int,
    prune_layer: int = 3,
    prune_ratio: float = 0.5,
    base_model_name_or_path: str | None = None,
) -> STTSConfig:
    """The `STTSConfig` of an imported official scorer, for the HF Molmo2 model (`Molmo2ForConditionalGeneration`).

    Args:
        state (`Mapping[str, torch.Tensor]`): the converted scorer state (`molmo2_scorer_state_dict`).
        num_vision_blocks (`int`): blocks of the base model's ViT.
        prune_layer (`int`): the ViT block the scorer reads (the paper's 3).
        prune_ratio (`float`): the runtime default (`set_prune_ratio` changes it).
        base_model_name_or_path (`str`, *optional*): the Hub id of the base model, recorded in the adapter.

    Returns:
        `STTSConfig`
    """
    width = state["pool.attention.out_proj.weight"].shape[0]
    return STTSConfig(
        prune_ratio=prune_ratio,
        prune_layer=prune_layer,
        scorer_hidden_size=int(state["mlp.0.weight"].shape[0]),
        scorer_input_norm=False,
        architecture="molmo2",
        base_model_class="Molmo2ForConditionalGeneration",
        base_model_name_or_path=base_model_name_or_path,
        vision_hidden_size=int(width),
        num_vision_blocks=num_vision_blocks,
        patches_per_unit=MOLMO2_PATCHES_PER_UNIT,
    )


def _safetensors_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors"))
    return []


def convert_molmo2_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    prune_layer: int = 3,
    prune_ratio: float = 0.5,
    num_heads: int | None = None,
    num_vision_blocks: int | None = None,
    base_model_name_or_path: str | None = None,
) -> STTSConfig:
    """Write the STTS scorer of an official Molmo2 checkpoint as an adapter folder (`STTSModel.from_pretrained`
    loads it onto `Molmo2ForConditionalGeneration`).

    Args:
        checkpoint: the official checkpoint: a `.safetensors` file or a folder of them.
        output_dir: the adapter folder to write.
        prune_layer (`int`): the ViT block the scorer reads (the paper's 3; check the checkpoint's training config).
        prune_ratio (`float`): the default ratio (a runtime knob).
        num_heads (`int`, *optional*): the pooler's query heads; needed for grouped-query attention only.
        num_vision_blocks (`int`, *optional*): the ViT's depth, when the checkpoint holds the scorer alone.
        base_model_name_or_path (`str`, *optional*): the HF Molmo2 model to record (e.g. "allenai/Molmo2-4B").

    Returns:
        `STTSConfig`: the written config.

    Raises:
        AdapterLoadError: if the checkpoint holds no (complete) scorer, or its ViT depth is unknown.
    """
    from .io import SCORER_PREFIX, write_adapter

    official, blocks = read_molmo2_checkpoint(checkpoint)
    state = molmo2_scorer_state_dict(official, num_heads)
    depth = num_vision_blocks or blocks
    if depth is None:
        raise AdapterLoadError(
            f"{os.fspath(checkpoint)} holds the scorer but no ViT block: pass num_vision_blocks (the base model's "
            "vision_config.num_hidden_layers)."
        )
    config = molmo2_adapter_config(state, depth, prune_layer, prune_ratio, base_model_name_or_path)
    write_adapter(output_dir, config, {SCORER_PREFIX + name: tensor for name, tensor in state.items()})
    return config
