"""The analytic FLOP model: matrix-multiply FLOPs of a forward, a training step and `generate`, by part of the model,
for the baseline and for STTS (ideal and as executed), and `counted_flops`, the `FlopCounterMode` count that checks it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.speed.kinds import NEW_TOKENS
from stts_adapter.model_registry.llava_onevision import nearest_cell_units
from stts_adapter.packing import RowPacking


@dataclass
class FlopCount:
    """Matrix-multiply FLOPs (2 per multiply-add) of one forward pass, by part of the model.

    `*_attention` fields are the attention products (Q K^T and P V, quadratic in the segment length); the others are
    weight matmuls. `vit_head`: blocks 0..prune_layer (every token); `bias_block`: block prune_layer+1 (every token,
    the key bias), its query/key/value projections apart in `bias_block_qkv`; `vit_tail`: blocks prune_layer+2..
    (kept tokens only); `scorer_input`: the scorer's products with the patches as one input (the query projection
    of their mean, the scores, the mixing), `scorer` the rest of it.

    The LLM's causal attention needs the products on and below the diagonal (`llm_attention`): the causal kernels
    both arms run (CPU's fused SDPA, FlashAttention) skip the rest, while the math SDPA backend computes the whole
    square and `FlopCounterMode` counts it. That rest stands apart in `llm_attention_masked`: outside the ideal
    (`forward`, `train_step`), inside `counted_forward` and `train_step(counted=True)`.
    """

    patch_embed: float = 0.0
    vit_head: float = 0.0
    vit_head_attention: float = 0.0
    bias_block_qkv: float = 0.0
    bias_block: float = 0.0
    bias_block_attention: float = 0.0
    vit_tail: float = 0.0
    vit_tail_attention: float = 0.0
    connector: float = 0.0
    llm: float = 0.0
    llm_attention: float = 0.0
    llm_attention_masked: float = 0.0
    lm_head: float = 0.0
    scorer_input: float = 0.0
    scorer: float = 0.0

    def forward(self) -> float:
        """FLOPs of the whole forward that the computation needs (without `llm_attention_masked`)."""
        return float(sum(dataclasses.astuple(self))) - self.llm_attention_masked

    def counted_forward(self) -> float:
        """FLOPs of the whole forward as `FlopCounterMode` counts them with the math SDPA backend."""
        return self.forward() + self.llm_attention_masked

    def train_step(self, whole_model: bool, counted: bool = False) -> float:
        """Forward + backward FLOPs (autograd computes only the gradients something needs).

        A weight matmul costs 3x its forward when its weight trains (forward, input and weight gradients), 2x when
        only the input gradient flows or only the weight trains, 1x when no gradient passes; attention products 3x
        (2 forward, 4 backward). Whole model: everything 3x but the patch embedding (no input gradient: 2x).
        Scorer only, the gradient flows from the loss down to block prune_layer+1: with STTS (a scorer is counted)
        it reaches that block only through the key bias, so its q/k/v projections need nothing (1x) and its
        attention only dP = dO V^T (1.5x); the scorer's products with the patches have an input without gradient
        (2x). The baseline (`gradient_probe`) back-propagates into that block's input: 2x / 3x like the blocks after it.
        `counted`: with `llm_attention_masked` (3x), as `FlopCounterMode` counts with the math SDPA backend.
        """
        masked = 3 * self.llm_attention_masked if counted else 0.0
        if whole_model:
            return 2 * self.patch_embed + 3 * (self.forward() - self.patch_embed) + masked
        total = self.patch_embed + self.vit_head + self.vit_head_attention
        total += 2 * (self.bias_block + self.vit_tail + self.connector + self.llm + self.lm_head)
        total += 3 * (self.vit_tail_attention + self.llm_attention)
        if self.scorer > 0:
            total += self.bias_block_qkv + 1.5 * self.bias_block_attention + 2 * self.scorer_input + 3 * self.scorer
        else:
            total += 2 * self.bias_block_qkv + 3 * self.bias_block_attention
        return total + masked

    def scoring(self) -> float:
        """FLOPs of the scorer, with the gathering of its input."""
        return self.scorer_input + self.scorer

    def as_dict(self) -> dict[str, float]:
        """The count by part, for the JSON."""
        return dataclasses.asdict(self)


def attention_products(lengths: torch.Tensor, width: int) -> float:
    """Q K^T and P V of self-attention within segments of `lengths` tokens, summed over heads: 2 x 2 L^2 width."""
    return float(4 * (lengths.double() ** 2).sum() * width)


def decoder_flops(text_config: Any, queries: int, keys: int) -> tuple[float, float, float]:
    """(weight matmuls, attention products needed, attention products masked) of the LLM's decoder layers for
    `queries` new tokens, the last of `keys` positions, attending causally (GQA: the products run over all query
    heads). Query i of the new tokens needs the keys up to its own position; the masked rest of the `queries` x `keys`
    rectangle is what the math SDPA backend computes anyway and a causal kernel skips."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_width = text_config.num_key_value_heads * head_dim
    per_token = 2 * (2 * hidden * heads * head_dim + 2 * hidden * kv_width + 3 * hidden * text_config.intermediate_size)
    layers = text_config.num_hidden_layers
    needed_pairs = queries * (keys - queries) + queries * (queries + 1) // 2
    per_pair = layers * 4 * heads * head_dim
    return (
        float(layers * queries * per_token),
        float(per_pair * needed_pairs),
        float(per_pair * (queries * keys - needed_pairs)),
    )


def lm_head_flops(text_config: Any, tokens: int) -> float:
    """FLOPs of the lm_head on `tokens` positions."""
    return float(2 * tokens * text_config.hidden_size * text_config.vocab_size)


def add_scorer(count: FlopCount, units: int, patches: int, width: int, heads: int, hidden: int) -> None:
    """The STTS scorer on `units` units of `patches` patches: attention pooling with its key and value projections
    on the unit side (`UnitAttentionPool`: the query projection, the query through the key projection, the scores
    and the mixing per head, the value and output projections) and the MLP 2D -> H -> H -> 1."""
    count.scorer_input = float(2 * units * width * width + 2 * 2 * units * heads * patches * width)
    pooling = 3 * 2 * units * width * width
    count.scorer = float(pooling + 2 * units * (2 * width * hidden + hidden * hidden + hidden))


def add_language_model(count: FlopCount, text_config: Any, sequence_length: int) -> FlopCount:
    """Add the LLM (decoder layers and lm_head) on `sequence_length` tokens to `count`; returns it."""
    count.llm, count.llm_attention, count.llm_attention_masked = decoder_flops(
        text_config, sequence_length, sequence_length
    )
    count.lm_head = lm_head_flops(text_config, sequence_length)  # a forward with labels computes every position
    return count


def add_block(count: FlopCount, role: int, qkv: float, other: float, attention: float) -> None:
    """Add a ViT block's FLOPs to its part: `role` < 0 before the bias block, 0 the bias block, > 0 after it."""
    if role < 0:
        count.vit_head += qkv + other
        count.vit_head_attention += attention
    elif role == 0:
        count.bias_block_qkv += qkv
        count.bias_block += other
        count.bias_block_attention += attention
    else:
        count.vit_tail += qkv + other
        count.vit_tail_attention += attention


def window_lengths(kept_units: torch.Tensor, window: int) -> torch.Tensor:
    """Kept units of every attention window of Qwen2.5-VL: the unit grid of each temporal slot, padded to a multiple
    of `window` units, cut into window x window squares (empty windows are dropped, as the model drops them)."""
    slots, rows, columns = kept_units.shape
    padded = torch.nn.functional.pad(kept_units.long(), (0, -columns % window, 0, -rows % window))
    per_window = padded.reshape(slots, padded.shape[1] // window, window, padded.shape[2] // window, window)
    lengths = per_window.sum(dim=(2, 4)).flatten()
    return lengths[lengths > 0]


def qwen2_5_vl_flops(
    config: Any,
    keep: torch.Tensor,
    sequence_length: int,
    prune_layer: int,
    scorer_hidden: int | None = None,
    executed: bool = False,
) -> FlopCount:
    """Forward FLOPs of a Qwen2.5-VL model on one video.

    Args:
        config: the model config.
        keep (`torch.Tensor` of shape `(slots, unit_rows, unit_columns)`, bool): kept units (all True: baseline).
        sequence_length (`int`): LLM tokens (of the pruned sequence for STTS).
        prune_layer (`int`): blocks after prune_layer + 1 run on the kept units only.
        scorer_hidden (`int`, *optional*): the scorer's MLP width; None: no scorer, no pruning (the bare model).
        executed (`bool`): count what the implementation runs rather than the ideal: block prune_layer + 1's biased
            attention pads every segment to the longest one.
    """
    vision = config.vision_config
    width, mlp, merge = vision.hidden_size, vision.intermediate_size, vision.spatial_merge_size
    unit = merge * merge
    stts = scorer_hidden is not None
    everything = torch.ones_like(keep, dtype=torch.bool)
    patch_input = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    count = FlopCount(patch_embed=2.0 * keep.numel() * unit * patch_input * width)
    window = vision.window_size // (vision.patch_size * merge)
    for block in range(vision.depth):
        kept = keep if stts and block > prune_layer + 1 else everything
        if block in vision.fullatt_block_indexes:
            lengths = kept.flatten(1).sum(1) * unit  # one segment per temporal slot
            lengths = lengths[lengths > 0]
        else:
            lengths = window_lengths(kept, window) * unit
        tokens = int(lengths.sum())
        other = 2.0 * tokens * width * (width + 3 * mlp)  # proj D^2, gate/up/down 3DI
        qkv = 2.0 * tokens * width * 3 * width
        if executed and stts and block == prune_layer + 1:  # only the attention products run padded
            lengths = lengths.max().expand(len(lengths))
        add_block(count, block - prune_layer - 1, qkv, other, attention_products(lengths, width))
    kept_units = int(keep.sum()) if stts else keep.numel()
    count.connector = 2.0 * kept_units * unit * width * (unit * width + vision.out_hidden_size)
    if stts:
        add_scorer(count, keep.numel(), unit, width, vision.num_heads, scorer_hidden)
    return add_language_model(count, config.text_config, sequence_length)


def llava_onevision_flops(
    config: Any,
    keep: torch.Tensor,
    sequence_length: int,
    prune_layer: int,
    scorer_hidden: int | None = None,
    executed: bool = False,
) -> FlopCount:
    """Forward FLOPs of a LLaVA-OneVision model on one video (arguments as in `qwen2_5_vl_flops`).

    Ideal: blocks after prune_layer + 1 attend within each frame's kept patches and the projector runs on kept
    patches. Executed: those blocks run packed rows of the full frame length (padding slots included, attention over
    the whole row under a block-diagonal mask); the projector runs on the patches the kept tokens' bilinear pooling
    reads (the kept cells' on an even grid, a few more on an odd one, where the weights reach across cells).
    """
    vision = config.vision_config
    width, mlp = vision.hidden_size, vision.intermediate_size
    side = vision.image_size // vision.patch_size
    frames, pooled = keep.shape[0], keep.shape[1]
    tokens_per_frame = side * side
    cell = nearest_cell_units(side, side, pooled, pooled)  # unit of every patch of a frame
    cell_sizes = torch.bincount(cell, minlength=pooled * pooled)
    keep_patch = keep.flatten(1)[:, cell]  # (frames, patches)
    stts = scorer_hidden is not None
    full = torch.full((frames,), tokens_per_frame)
    patch_input = vision.num_channels * vision.patch_size**2
    count = FlopCount(patch_embed=2.0 * frames * tokens_per_frame * patch_input * width)
    for block in range(vision.num_hidden_layers):
        if not stts or block <= prune_layer + 1:
            lengths = full
        elif executed:
            rows = RowPacking.build(keep_patch.flatten(), tokens_per_frame).num_rows
            lengths = torch.full((rows,), tokens_per_frame)
        else:
            lengths = keep_patch.sum(1)
            lengths = lengths[lengths > 0]
        tokens = int(lengths.sum())
        other = 2.0 * tokens * width * (width + 2 * mlp)  # out D^2, fc1 and fc2 DI
        qkv = 2.0 * tokens * width * 3 * width
        add_block(count, block - prune_layer - 1, qkv, other, attention_products(lengths, width))
    text_width = config.text_config.hidden_size
    if not stts:
        projected = frames * tokens_per_frame
    else:
        projected = patches_read(keep.flatten(1), side) if executed else int(keep_patch.sum())
    count.connector = 2.0 * projected * text_width * (width + text_width)
    if stts:
        add_scorer(count, keep.numel(), int(cell_sizes.max()), width, vision.num_attention_heads, scorer_hidden)
    return add_language_model(count, config.text_config, sequence_length)


def patches_read(keep: torch.Tensor, side: int) -> int:
    """Patches that the kept tokens `(frames, pooled tokens)` of LLaVA-OneVision's bilinear 2x pooling of a `side`
    x `side` grid read (`align_corners=False`: up to 2 x 2 patches each)."""
    pooled = math.isqrt(keep.shape[1])
    identity = torch.eye(side * side).view(1, side * side, side, side)  # one channel per patch
    reads = F.interpolate(identity, size=(pooled, pooled), mode="bilinear")[0].flatten(1).T != 0  # (tokens, grid)
    return int(((keep.float() @ reads.float()) > 0).sum())


def generate_flops(count: FlopCount, text_config: Any, prompt_length: int, new_tokens: int = NEW_TOKENS) -> float:
    """`generate(max_new_tokens=new_tokens)`: the prefill (logits of the last position only) and new_tokens - 1
    decoding steps of one token over the KV cache."""
    total = count.forward() - count.lm_head + lm_head_flops(text_config, 1)
    for step in range(1, new_tokens):
        linear, attention, _ = decoder_flops(text_config, 1, prompt_length + step)
        total += linear + attention + lm_head_flops(text_config, 1)
    return total


def flop_speedups(base: FlopCount, stts: FlopCount, text_config: Any, prompt_length: int, pruned: int) -> dict:
    """Baseline FLOPs / STTS FLOPs for every measurement kind."""
    return {
        "forward": base.forward() / stts.forward(),
        "generate": generate_flops(base, text_config, prompt_length)
        / generate_flops(stts, text_config, prompt_length - pruned),
        "train_scorer": base.train_step(False) / stts.train_step(False),
        "train_whole": base.train_step(True) / stts.train_step(True),
    }


def counted_flops(run: Callable[[], object]) -> int:
    """FLOPs of `run()` by `FlopCounterMode`, with the math SDPA backend: CPU's default fused kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula and would count attention as 0."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        run()
    return counter.get_total_flops()
