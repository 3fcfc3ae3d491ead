"""Speed of STTS against the unpruned model, measured in one process.

For every model family, frame count and prune ratio: the inference forward (prefill), `generate` of 16 tokens, and a
training step (forward + backward + zero_grad) with only the scorer trainable and with the whole model trainable.
Baseline and STTS run alternately (round-robin over the ratios at a frame count), medians over `--repeats` runs,
speed-up as a ratio. Next to every measured speed-up stands the ideal one, from an analytic count of matrix-multiply
FLOPs (cross-checked against `torch.utils.flop_counter.FlopCounterMode`); also the peak memory of a training step
(fresh child processes) and the scorer's own cost. Writes `speed.json`, `speed.md` and `speed.png` into `--out`.

    python benchmarks/speed.py                           # 2 families, 8-32 frames x 3 ratios + 64 frames at 50%
                                                         # (~20 min on 2 quiet cores)
    python benchmarks/speed.py --all-ratios-at 8 16 32 64  # the full grid (~25 min)
    python benchmarks/speed.py --quick --out /tmp/speed  # smoke test: 8 frames of 112 px, one ratio, one repeat
    python benchmarks/speed.py --profile --frames 32 --ratios 0.5 --threads 1   # where STTS spends its time
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import itertools
import json
import math
import multiprocessing
import os
import platform
import pstats
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.model_registry.llava_onevision import nearest_cell_units
from stts_adapter.packing import RowPacking
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.testing import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    Sample,
    build_qwen_batch,
    moving_square_video,
    small_qwen2_5_vl_config,
    tiny_text_config,
)
from stts_adapter.testing.llava_onevision import build_llava_onevision_batch

NEW_TOKENS = 16
KINDS = ("forward", "generate", "train_scorer", "train_whole")
KIND_TITLES = {
    "forward": "forward (prefill)",
    "generate": f"generate {NEW_TOKENS} tokens",
    "train_scorer": "train step, scorer only",
    "train_whole": "train step, whole model",
}
KIND_COLUMNS = {
    "forward": "forward",
    "generate": f"generate {NEW_TOKENS}",
    "train_scorer": "train, scorer only",
    "train_whole": "train, whole model",
}


# ================================================================================================ model families
def benchmark_llava_onevision_config(
    size: int = 224, vision_depth: int = 12, vision_width: int = 256, text_layers: int = 8, text_width: int = 512
) -> LlavaOnevisionConfig:
    """A benchmark-size LLaVA-OneVision config (random init): a SigLIP tower (4 heads, MLP 4x width as in SigLIP,
    `size` px frames, patch 14, no head) and a Qwen2 LLM (4 heads, 2 KV heads, MLP 2x width).

    Args:
        size (`int`): frame side in pixels (the tower's image_size; the processor resizes frames to it).
        vision_depth, vision_width (`int`): ViT blocks and width.
        text_layers, text_width (`int`): LLM layers and width.
    """
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_depth,
        num_attention_heads=4,
        image_size=size,
        patch_size=14,
        vision_use_head=False,
    )
    text = tiny_text_config(text_width, text_layers, 2 * text_width, mrope=False, model_type="qwen2")
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[size, size]],
    )


@dataclass(frozen=True)
class Family:
    """One model family of the benchmark.

    Args:
        name (`str`): the `--family` value.
        description (`str`): the model, for the markdown.
        model_class (`type`): transformers class.
        make_config (`Callable[[int], PretrainedConfig]`): benchmark config for a frame side in pixels.
        build_batch (`Callable[[config, list[Sample]], dict]`): the processor-faithful batch builder.
        unit_grid (`Callable[[config, int], tuple[int, int]]`): units per frame side (rows, columns) at a frame side.
        flops (`Callable[..., FlopCount]`): the analytic FLOP model (see `qwen2_5_vl_flops`).
    """

    name: str
    description: str
    model_class: type
    make_config: Callable[[int], Any]
    build_batch: Callable[[Any, list[Sample]], dict[str, torch.Tensor]]
    unit_grid: Callable[[Any, int], tuple[int, int]]
    flops: Callable[..., FlopCount]

    def batch(self, config: Any, frames: int, size: int, answer: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
        """One video of `frames` frames at `size` px on `device`; with a 2-token answer (labels) for training,
        without for `generate`."""
        sample = Sample(video=moving_square_video(frames, size, size), answer=[5, 6] if answer else None)
        return {name: value.to(device) for name, value in self.build_batch(config, [sample]).items()}


def _qwen_unit_grid(config: Any, size: int) -> tuple[int, int]:
    side = size // (config.vision_config.patch_size * config.vision_config.spatial_merge_size)
    return side, side


def _llava_unit_grid(config: Any, size: int) -> tuple[int, int]:
    pooled = math.ceil(size // config.vision_config.patch_size / 2)
    return pooled, pooled


# ================================================================================================ FLOP model
@dataclass
class FlopCount:
    """Matrix-multiply FLOPs (2 per multiply-add) of one forward pass, by part of the model.

    `*_attention` fields are the attention products (Q K^T and P V, quadratic in the segment length); the others are
    weight matmuls. `vit_head`: blocks 0..prune_layer (every token); `bias_block`: block prune_layer+1 (every token,
    the key bias), its query/key/value projections apart in `bias_block_qkv`; `vit_tail`: blocks prune_layer+2..
    (kept tokens only); `scorer_input`: the scorer's query and key/value projections, `scorer` the rest of it.
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
    lm_head: float = 0.0
    scorer_input: float = 0.0
    scorer: float = 0.0

    def forward(self) -> float:
        return float(sum(dataclasses.astuple(self)))

    def train_step(self, whole_model: bool) -> float:
        """Forward + backward FLOPs (autograd computes only the gradients something needs).

        A weight matmul costs 3x its forward when its weight trains (forward, input and weight gradients), 2x when
        only the input gradient flows or only the weight trains, 1x when no gradient passes; attention products 3x
        (2 forward, 4 backward). Whole model: everything 3x but the patch embedding (no input gradient: 2x).
        Scorer only, the gradient flows from the loss down to block prune_layer+1: with STTS (a scorer is counted)
        it reaches that block only through the key bias, so its q/k/v projections need nothing (1x) and its
        attention only dP = dO V^T (1.5x); the scorer's input projections have an input without gradient (2x). The
        baseline (`gradient_probe`) back-propagates into that block's input: 2x / 3x like the blocks after it.
        """
        if whole_model:
            return 2 * self.patch_embed + 3 * (self.forward() - self.patch_embed)
        total = self.patch_embed + self.vit_head + self.vit_head_attention
        total += 2 * (self.bias_block + self.vit_tail + self.connector + self.llm + self.lm_head)
        total += 3 * (self.vit_tail_attention + self.llm_attention)
        if self.scorer > 0:
            total += self.bias_block_qkv + 1.5 * self.bias_block_attention + 2 * self.scorer_input + 3 * self.scorer
        else:
            total += 2 * self.bias_block_qkv + 3 * self.bias_block_attention
        return total

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def attention_products(lengths: torch.Tensor, width: int) -> float:
    """Q K^T and P V of self-attention within segments of `lengths` tokens, summed over heads: 2 x 2 L^2 width."""
    return float(4 * (lengths.double() ** 2).sum() * width)


def decoder_flops(text_config: Any, queries: int, keys: int) -> tuple[float, float]:
    """(weight matmuls, attention products) of the LLM's decoder layers for `queries` new tokens attending to `keys`
    positions (GQA: the products run over all query heads; causal masking is not subtracted, as the CPU kernels and
    FlopCounterMode count the full rectangle)."""
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    kv_width = text_config.num_key_value_heads * head_dim
    per_token = 2 * (2 * hidden * heads * head_dim + 2 * hidden * kv_width + 3 * hidden * text_config.intermediate_size)
    layers = text_config.num_hidden_layers
    return float(layers * queries * per_token), float(layers * 4 * queries * keys * heads * head_dim)


def lm_head_flops(text_config: Any, tokens: int) -> float:
    return float(2 * tokens * text_config.hidden_size * text_config.vocab_size)


def add_scorer(count: FlopCount, units: int, patches: int, width: int, hidden: int) -> None:
    """The STTS scorer on `units` units of `patches` patches: attention pooling (query and key/value input
    projections; the products and the output projection) and the MLP 2D -> H -> H -> 1."""
    count.scorer_input = float(2 * units * width * width + 2 * units * patches * width * 2 * width)
    pooling = 4 * units * patches * width + 2 * units * width * width
    count.scorer = float(pooling + 2 * units * (2 * width * hidden + hidden * hidden + hidden))


def add_language_model(count: FlopCount, text_config: Any, sequence_length: int) -> FlopCount:
    count.llm, count.llm_attention = decoder_flops(text_config, sequence_length, sequence_length)
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
        add_scorer(count, keep.numel(), unit, width, scorer_hidden)
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
    the whole row under a block-diagonal mask) and the projector runs on every patch (the pooling needs the grid).
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
    projected = int(keep_patch.sum()) if stts and not executed else frames * tokens_per_frame
    count.connector = 2.0 * projected * text_width * (width + text_width)
    if stts:
        add_scorer(count, keep.numel(), int(cell_sizes.max()), width, scorer_hidden)
    return add_language_model(count, config.text_config, sequence_length)


def generate_flops(count: FlopCount, text_config: Any, prompt_length: int, new_tokens: int = NEW_TOKENS) -> float:
    """`generate(max_new_tokens=new_tokens)`: the prefill (logits of the last position only) and new_tokens - 1
    decoding steps of one token over the KV cache."""
    total = count.forward() - count.lm_head + lm_head_flops(text_config, 1)
    for step in range(1, new_tokens):
        linear, attention = decoder_flops(text_config, 1, prompt_length + step)
        total += linear + attention + lm_head_flops(text_config, 1)
    return total


def counted_flops(run: Callable[[], object]) -> int:
    """FLOPs of `run()` by `FlopCounterMode`, with the math SDPA backend: CPU's default fused kernel
    (`_scaled_dot_product_flash_attention_for_cpu`) has no FLOP formula and would count attention as 0."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        run()
    return counter.get_total_flops()


FAMILIES = {
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        description="Qwen2.5-VL-style model (ViT 12x256 with windows of 4x4 units and full attention in blocks "
        "2, 5, 8, 11, LLM 8x512, random init); varlen ViT",
        model_class=Qwen2_5_VLForConditionalGeneration,
        make_config=lambda size: small_qwen2_5_vl_config(),
        build_batch=build_qwen_batch,
        unit_grid=_qwen_unit_grid,
        flops=qwen2_5_vl_flops,
    ),
    "llava_onevision": Family(
        name="llava_onevision",
        description="LLaVA-OneVision-style model (SigLIP 12x256, MLP 1024, LLM 8x512, random init); frames run as "
        "the ViT's batch, pruned blocks run packed rows",
        model_class=LlavaOnevisionForConditionalGeneration,
        make_config=benchmark_llava_onevision_config,
        build_batch=build_llava_onevision_batch,
        unit_grid=_llava_unit_grid,
        flops=llava_onevision_flops,
    ),
}


# ================================================================================================ measuring
def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> float:
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


def alternate(
    baseline: Callable[[], object], variants: Sequence[Callable[[], object]], repeats: int
) -> tuple[float, list[float]]:
    """Median seconds of the baseline and of every variant, measured round-robin (baseline, variant 1, ...,
    baseline, ...) after one warm-up of each, so that a drift in the machine's speed hits them all alike."""
    runs = [baseline, *variants]
    for run in runs:
        run()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, times in zip(runs, samples):
            times.append(timed(run))
    medians = [statistics.median(times) for times in samples]
    return medians[0], medians[1:]


def vision_block(model: STTSModel, index: int) -> nn.Module:
    return model.architecture.get_vision_blocks(model.transformers_model)[index]


def bare(model: STTSModel, run: Callable[[], object]) -> Callable[[], object]:
    """`run` on the base model (STTS disabled)."""

    def run_bare() -> object:
        with model.disable_stts():
            return run()

    return run_bare


def with_ratio(model: STTSModel, ratio: float, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with STTS at `ratio`."""

    def run_pruned() -> object:
        model.set_prune_ratio(ratio)
        return run()

    return run_pruned


def gradient_probe(model: STTSModel, run: Callable[[], object]) -> Callable[[], object]:
    """`run` on the bare model with the output of ViT block prune_layer requiring grad: the backward then takes the
    path the scorer's gradient takes with STTS (loss -> LLM -> connector -> blocks prune_layer+1..), with the base
    model frozen. This is the baseline of scorer-only training (a frozen bare model has nothing to train)."""

    def requires_grad(module: nn.Module, args: tuple, output: Any) -> None:
        (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

    def run_probed() -> object:
        handle = vision_block(model, model.stts_config.prune_layer).register_forward_hook(requires_grad)
        try:
            with model.disable_stts():
                return run()
        finally:
            handle.remove()

    return run_probed


def forward_step(model: STTSModel, batch: dict) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model(**batch)

    return run


def generate_step(model: STTSModel, prompt: dict) -> Callable[[], object]:
    def run() -> object:
        return model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    return run


def train_step(model: STTSModel, batch: dict) -> Callable[[], object]:
    def run() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def rewrap(model: STTSModel, train_base_model: bool) -> STTSModel:
    """The same base model and scorer weights, wrapped again with `train_base_model` (which decides, at wrap time,
    which parameters train)."""
    scorer_state = model.scorer.state_dict()
    config = STTSConfig(
        prune_ratio=model.stts_config.prune_ratio,
        prune_layer=model.stts_config.prune_layer,
        train_base_model=train_base_model,
    )
    training = model.training
    wrapped = apply_stts(model.unload(), config)
    wrapped.scorer.load_state_dict(scorer_state)
    wrapped.train(training)
    return wrapped


def block_output(model: STTSModel, batch: dict, index: int) -> torch.Tensor:
    """Output of ViT block `index` in a forward of the bare model."""
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = vision_block(model, index).register_forward_hook(capture)
    try:
        bare(model, forward_step(model, batch))()
    finally:
        handle.remove()
    return captured[0]


def scoring_step(model: STTSModel, batch: dict, training: bool) -> Callable[[], None]:
    """One scoring step alone on block prune_layer's output, as a pruning pass runs it (`VisionPruningPass.score`:
    unit gathering, scorer, temporal aux loss, key bias, selection); in training with the scorer's backward."""
    entry, base = model.architecture, model.transformers_model
    hidden = block_output(model, batch, model.stts_config.prune_layer)
    layout = entry.video_layout(base, batch)
    tokens = entry.vision_tokens(base, batch, layout)

    def run() -> None:
        vision_pass = VisionPruningPass(entry, model.pruning_settings(), model.scorer, layout, tokens)
        with torch.set_grad_enabled(training):
            vision_pass.score(hidden)
            if training:
                (vision_pass.aux_loss + vision_pass.token_bias.sum()).backward()
                model.zero_grad(set_to_none=True)

    return run


@dataclass
class Case:
    """What the measurements of one (family, frames) share."""

    family: Family
    config: Any
    frames: int
    ratios: list[float]
    repeats: int
    batch: dict[str, torch.Tensor]
    prompt: dict[str, torch.Tensor]


def ratio_variants(model: STTSModel, ratios: Sequence[float], run: Callable[[], object]) -> list[Callable[[], object]]:
    return [with_ratio(model, ratio, run) for ratio in ratios]


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timed runs after one warm-up."""
    run()
    return statistics.median(timed(run) for _ in range(repeats))


# ================================================================================================ one frame count
def pruned_forward(model: STTSModel, batch: dict, ratio: float, count: bool) -> tuple[Any, int | None]:
    """An STTS forward at `ratio` (eval): its report, and its FlopCounterMode count when `count`."""
    model.set_prune_ratio(ratio)
    outputs: list[Any] = []
    run = forward_step(model, batch)
    flops = counted_flops(lambda: outputs.append(run())) if count else None
    return (outputs[0] if outputs else run()).stts, flops


def flop_speedups(base: FlopCount, stts: FlopCount, text_config: Any, prompt_length: int, pruned: int) -> dict:
    """Baseline FLOPs / STTS FLOPs for every measurement kind."""
    return {
        "forward": base.forward() / stts.forward(),
        "generate": generate_flops(base, text_config, prompt_length)
        / generate_flops(stts, text_config, prompt_length - pruned),
        "train_scorer": base.train_step(False) / stts.train_step(False),
        "train_whole": base.train_step(True) / stts.train_step(True),
    }


def flop_analysis(model: STTSModel, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Analytic FLOPs of the baseline and of STTS at every ratio (with the kept units of a real forward), and the
    FlopCounterMode counts of the same forwards (`args.flop_check`)."""
    family, config, batch, layer = case.family, case.config, case.batch, args.prune_layer
    rows, columns = family.unit_grid(config, args.size)
    length, prompt_length = batch["input_ids"].shape[1], case.prompt["input_ids"].shape[1]
    model.eval()
    per_ratio: dict[float, dict[str, Any]] = {}
    for ratio in case.ratios:
        report, counted = pruned_forward(model, batch, ratio, args.flop_check)
        keep = report.keep_masks[0].cpu().reshape(-1, rows, columns)
        base = family.flops(config, torch.ones_like(keep), length, layer)  # the same at every ratio
        pruned = report.units_before[0] - report.units_after[0]
        ideal = family.flops(config, keep, length - pruned, layer, model.scorer.hidden_size)
        executed = family.flops(config, keep, length - pruned, layer, model.scorer.hidden_size, executed=True)
        per_ratio[ratio] = {
            "units": [report.units_before[0], report.units_after[0]],
            "sequence": [length, length - pruned],
            "ideal": ideal.as_dict(),
            "executed": executed.as_dict(),
            "executed_counted": counted,
            "executed_counted_ratio": executed.forward() / counted if counted else None,
            "speedup": flop_speedups(base, ideal, config.text_config, prompt_length, pruned),
            "executed_speedup": flop_speedups(base, executed, config.text_config, prompt_length, pruned),
        }
    counted_base = counted_flops(bare(model, forward_step(model, batch))) if args.flop_check else None
    return {
        "baseline": base.as_dict(),
        "baseline_counted": counted_base,
        "baseline_counted_ratio": base.forward() / counted_base if counted_base else None,
        "per_ratio": per_ratio,
    }


def measure_inference(model: STTSModel, case: Case) -> dict[str, Any]:
    """Forward and generate, baseline vs every ratio (forward also at ratio 0: the machinery's own overhead), and
    the scoring step alone (inference and training)."""
    model.eval()
    forward = forward_step(model, case.batch)
    forward_base, forward_stts = alternate(
        bare(model, forward), ratio_variants(model, [0.0, *case.ratios], forward), case.repeats
    )
    generate = generate_step(model, case.prompt)
    generate_base, generate_stts = alternate(
        bare(model, generate), ratio_variants(model, case.ratios, generate), case.repeats
    )
    scorer_forward = median_seconds(scoring_step(model, case.batch, training=False), case.repeats)
    model.train()
    scorer_train = median_seconds(scoring_step(model, case.batch, training=True), case.repeats)
    return {
        "forward": (forward_base, forward_stts[1:]),
        "generate": (generate_base, generate_stts),
        "forward_ratio0_s": forward_stts[0],
        "scorer_forward_s": scorer_forward,
        "scorer_train_s": scorer_train,
    }


def measure_training(model: STTSModel, case: Case, whole_model: bool) -> tuple[float, list[float]]:
    """Training step, baseline vs every ratio. Scorer-only: the baseline is the frozen bare model back-propagating to
    block prune_layer's output (`gradient_probe`)."""
    model.train()
    step = train_step(model, case.batch)
    baseline = bare(model, step) if whole_model else gradient_probe(model, step)
    return alternate(baseline, ratio_variants(model, case.ratios, step), case.repeats)


# ================================================================================================ peak memory
def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM on Linux, else ru_maxrss (KiB on Linux, bytes on macOS).

    Not ru_maxrss on Linux: a spawned child is forked from the parent before it execs, and exec folds the forked
    copy's RSS (the parent's, ~1.3 GB after the timing phase) into the ru_maxrss of the child, where clear_refs
    cannot reset it. VmHWM is the child's own memory map's high-water mark.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: /proc/self/clear_refs), so that the peak of the measured step
    is not hidden by a higher one while importing and building the model."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def step_peak_mib(step: Callable[[], object], device: str) -> dict[str, Any]:
    """Peak memory increase (MiB) while `step` runs: `torch.cuda.max_memory_allocated` on a GPU, the peak RSS on
    CPU (reset first, so that the peak of importing and building is not the one read)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20, "peak_reset": True}
    reset = reset_peak_rss()
    before = current_rss()
    step()
    return {"mib": (peak_rss() - before) / 2**20, "peak_reset": reset}


def memory_child(family_name: str, frames: int, ratio: float | None, settings: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak memory increase (MiB) of the first whole-model training step, baseline when
    `ratio` is None. Weights and kept units are those of the main process (same seed, same build order)."""
    torch.set_num_threads(settings["threads"])
    family = FAMILIES[family_name]
    torch.manual_seed(0)
    config = family.make_config(settings["size"])
    stts_config = STTSConfig(prune_ratio=ratio or 0.0, prune_layer=settings["prune_layer"], train_base_model=True)
    model = apply_stts(family.model_class(config).to(settings["device"]), stts_config)
    model.train()
    step = train_step(model, family.batch(config, frames, settings["size"], answer=True, device=settings["device"]))
    return step_peak_mib(bare(model, step) if ratio is None else step, settings["device"])


def fresh_process_context() -> Any:
    """A multiprocessing context whose processes start fresh: forkserver, whose server process has imported torch,
    transformers, stts_adapter and the model classes and nothing else, so a job does not pay those imports (~4 s)
    again (it still runs this script's top level, then finds them imported); spawn where there is no forkserver.

    Preloading "__main__" would be simpler, but Python 3.11's forkserver never receives the main path."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    models = sorted({family.model_class.__module__ for family in FAMILIES.values()})
    context.set_forkserver_preload(["torch", "transformers", "stts_adapter", "stts_adapter.testing", *models])
    return context


def measure_memory(jobs: list[tuple[str, int, float | None]], args: argparse.Namespace) -> dict[tuple, dict]:
    """Run every memory job in a fresh process of its own (max_tasks_per_child=1: a worker never serves two jobs).
    RSS does not depend on what else runs, so jobs run in parallel on the cores the timing used."""
    settings = {"threads": args.threads, "size": args.size, "prune_layer": args.prune_layer, "device": args.device}
    workers = 1 if args.device != "cpu" else max(1, min(len(jobs), (os.cpu_count() or 1) // args.threads))
    context = fresh_process_context()
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {job: pool.submit(memory_child, *job, settings) for job in jobs}
        return {job: future.result() for job, future in tqdm(futures.items(), desc="peak memory")}


# ================================================================================================ assembling
def timing_entry(baseline: float, stts: float, ideal: float) -> dict[str, float]:
    speedup = baseline / stts
    return {"baseline_s": baseline, "stts_s": stts, "speedup": speedup, "ideal": ideal, "of_ideal": speedup / ideal}


def case_results(case: Case, flops: dict, inference: dict, scorer_train: tuple, whole_train: tuple) -> list[dict]:
    """One result row per ratio of a (family, frames) case."""
    timings = {
        "forward": inference["forward"],
        "generate": inference["generate"],
        "train_scorer": scorer_train,
        "train_whole": whole_train,
    }
    forward_base, whole_base = inference["forward"][0], whole_train[0]
    rows = []
    for index, ratio in enumerate(case.ratios):
        analysis = flops["per_ratio"][ratio]
        row = {
            "family": case.family.name,
            "frames": case.frames,
            "prune_ratio": ratio,
            "repeats": case.repeats,
            "video_tokens": analysis["units"],
            "llm_tokens": analysis["sequence"],
        }
        for kind in KINDS:
            baseline, stts = timings[kind]
            row[kind] = timing_entry(baseline, stts[index], analysis["speedup"][kind])
            row[kind]["executed_flops_speedup"] = analysis["executed_speedup"][kind]
        row["scorer"] = {
            "forward_fraction": inference["scorer_forward_s"] / forward_base,
            "train_fraction": inference["scorer_train_s"] / whole_base,
            "ratio0_forward_overhead": inference["forward_ratio0_s"] / forward_base - 1.0,
            "flops_fraction": (analysis["ideal"]["scorer"] + analysis["ideal"]["scorer_input"])
            / sum(flops["baseline"].values()),
        }
        row["flops"] = {"baseline": flops["baseline"], **{k: analysis[k] for k in ("ideal", "executed")}}
        row["flop_check"] = {
            "baseline_counted": flops["baseline_counted"],
            "baseline_analytic_over_counted": flops["baseline_counted_ratio"],
            "stts_executed_counted": analysis["executed_counted"],
            "stts_executed_analytic_over_counted": analysis["executed_counted_ratio"],
        }
        rows.append(row)
    return rows


def attach_memory(results: list[dict], memory: dict[tuple, dict]) -> None:
    for row in results:
        baseline = memory.get((row["family"], row["frames"], None))
        stts = memory.get((row["family"], row["frames"], row["prune_ratio"]))
        if baseline and stts:
            row["peak_memory_mib"] = {
                "baseline": baseline["mib"],
                "stts": stts["mib"],
                "peak_reset": stts["peak_reset"],
            }


# ================================================================================================ running
def ratios_at(frames: int, args: argparse.Namespace) -> list[float]:
    """Every ratio at the --all-ratios-at frame counts, the main ratio elsewhere."""
    if frames in args.all_ratios_at:
        return sorted(set(args.ratios))
    return [args.main_ratio]


def repeats_at(frames: int, args: argparse.Namespace) -> int:
    return min(args.repeats, args.long_repeats) if frames >= args.long_from else args.repeats


def new_model(family: Family, config: Any, args: argparse.Namespace) -> STTSModel:
    torch.manual_seed(0)  # the memory children build the same weights in the same order
    stts_config = STTSConfig(prune_ratio=args.main_ratio, prune_layer=args.prune_layer)
    return apply_stts(family.model_class(config).to(args.device), stts_config)


def benchmark_family(family: Family, args: argparse.Namespace, progress: tqdm) -> list[dict]:
    """Every frame count of one family: FLOPs, inference and scorer-only training with the scorer-only model, then
    whole-model training on the same weights wrapped again with train_base_model=True."""
    config = family.make_config(args.size)
    model = new_model(family, config, args)
    cases, partial = [], []
    for frames in args.frames:
        case = Case(
            family=family,
            config=config,
            frames=frames,
            ratios=ratios_at(frames, args),
            repeats=repeats_at(frames, args),
            batch=family.batch(config, frames, args.size, answer=True, device=args.device),
            prompt=family.batch(config, frames, args.size, answer=False, device=args.device),
        )
        progress.set_postfix_str(f"{family.name}, {frames} frames")
        flops = flop_analysis(model, case, args)
        partial.append((flops, measure_inference(model, case), measure_training(model, case, whole_model=False)))
        cases.append(case)
        progress.update()
    model = rewrap(model, train_base_model=True)
    results = []
    for case, (flops, inference, scorer_train) in zip(cases, partial):
        progress.set_postfix_str(f"{family.name}, {case.frames} frames, whole model")
        whole_train = measure_training(model, case, whole_model=True)
        results += case_results(case, flops, inference, scorer_train, whole_train)
        progress.update()
    model.unload()
    return results


# ================================================================================================ reporting
def machine_name(threads: int, device: str) -> str:
    model_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model_name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda"):
        model_name = f"{torch.cuda.get_device_name(device)} (host: {model_name})"
    return f"{model_name}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def speedup_cell(entry: dict[str, float]) -> str:
    return f"{entry['speedup']:.2f}x / {entry['ideal']:.2f}x ({entry['of_ideal']:.0%})"


def memory_cell(row: dict) -> str:
    memory = row.get("peak_memory_mib")
    if memory is None:
        return "-"
    return f"{memory['baseline']:.0f} -> {memory['stts']:.0f} ({memory['baseline'] / memory['stts']:.2f}x)"


def table_header(*columns: str) -> list[str]:
    """A markdown table's header line and separator line."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def speedup_table(rows: list[dict]) -> list[str]:
    lines = table_header(
        "frames",
        "prune ratio",
        "video tokens",
        "LLM tokens",
        *(KIND_COLUMNS[kind] for kind in KINDS),
        "peak memory, train step (MiB)",
        "scorer (fwd / train)",
    )
    for r in rows:
        scorer = r["scorer"]
        lines.append(
            f"| {r['frames']} | {r['prune_ratio']:.0%} | {r['video_tokens'][0]} -> {r['video_tokens'][1]} "
            f"| {r['llm_tokens'][0]} -> {r['llm_tokens'][1]} | "
            + " | ".join(speedup_cell(r[kind]) for kind in KINDS)
            + f" | {memory_cell(r)} | {scorer['forward_fraction']:.1%} / {scorer['train_fraction']:.1%} |"
        )
    return lines


def times_table(rows: list[dict]) -> list[str]:
    lines = table_header(
        "frames",
        "prune ratio",
        "repeats",
        *(f"{KIND_COLUMNS[kind]} (ms)" for kind in KINDS),
        "FLOP speed-up as executed (fwd / train)",
        "STTS at ratio 0 (fwd)",
    )
    for r in rows:
        times = [f"{r[k]['baseline_s'] * 1000:.0f} -> {r[k]['stts_s'] * 1000:.0f}" for k in KINDS]
        executed = f"{r['forward']['executed_flops_speedup']:.2f}x / {r['train_whole']['executed_flops_speedup']:.2f}x"
        lines.append(
            f"| {r['frames']} | {r['prune_ratio']:.0%} | {r['repeats']} | "
            + " | ".join(times)
            + f" | {executed} | {r['scorer']['ratio0_forward_overhead']:+.1%} |"
        )
    return lines


def flop_check_table(rows: list[dict]) -> list[str]:
    lines = table_header(
        "frames",
        "prune ratio",
        "baseline GFLOP (analytic)",
        "baseline analytic / counted",
        "STTS GFLOP ideal / as executed",
        "STTS as executed: analytic / counted",
        "scorer share of baseline FLOPs",
    )

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for r in rows:
        base, check = sum(r["flops"]["baseline"].values()) / 1e9, r["flop_check"]
        ideal, executed = (sum(r["flops"][k].values()) / 1e9 for k in ("ideal", "executed"))
        lines.append(
            f"| {r['frames']} | {r['prune_ratio']:.0%} | {base:.1f} | {ratio(check['baseline_analytic_over_counted'])} "
            f"| {ideal:.1f} / {executed:.1f} | {ratio(check['stts_executed_analytic_over_counted'])} "
            f"| {r['scorer']['flops_fraction']:.2%} |"
        )
    return lines


def target_lines(rows: list[dict], main_ratio: float) -> list[str]:
    """The issue's targets, checked on this family's rows."""
    main = sorted((r for r in rows if r["prune_ratio"] == main_ratio), key=lambda r: r["frames"])
    at32 = next((r for r in main if r["frames"] == 32), None)
    lines = []
    if at32 is not None:
        for kind in KINDS:
            e = at32[kind]
            verdict = "met" if e["speedup"] >= 1.6 and e["of_ideal"] >= 0.9 else "NOT met"
            lines.append(
                f"- {KIND_TITLES[kind]} at 32 frames, {main_ratio:.0%}: {e['speedup']:.2f}x, {e['of_ideal']:.0%} of "
                f"ideal (target >= 1.6x and >= 90%): {verdict}"
            )
    for kind in KINDS:
        speedups = [r[kind]["speedup"] for r in main]
        if len(speedups) > 1:
            rising = all(b >= a * 0.98 for a, b in itertools.pairwise(speedups))  # 2%: timing noise
            trend = " -> ".join(f"{s:.2f}x" for s in speedups)
            lines.append(f"- {KIND_TITLES[kind]}, rising with frames: {trend}: {'yes' if rising else 'NO'}")
    worst = max(r["scorer"]["train_fraction"] for r in rows)
    worst_forward = max(r["scorer"]["forward_fraction"] for r in rows)
    verdict = "met" if max(worst, worst_forward) < 0.03 else "NOT met"
    lines.append(
        f"- scorer cost, worst case: {worst_forward:.1%} of the baseline forward, {worst:.1%} of the baseline "
        f"whole-model training step (target < 3%): {verdict}"
    )
    return lines


def markdown(results: list[dict], settings: dict[str, Any]) -> str:
    # No title and level-4 family headings: benchmarks/readme_results.py pastes this file under README's "### Speed".
    lines = [
        f"Machine: {settings['machine']}. Frames {settings['size']} px, prune_layer {settings['prune_layer']}, one "
        "video per batch (text prompt + video + 2-token answer). Baseline (`disable_stts()`) and STTS alternated "
        "round-robin over the ratios of a frame count, in one process; medians of `repeats` runs after a warm-up.",
        "",
        f"Command: `python benchmarks/speed.py {' '.join(settings['argv'])}` ({settings['seconds'] / 60:.1f} min).",
        "",
        "- Cells `measured / ideal (fraction of ideal)`: measured = baseline time / STTS time; ideal = baseline FLOPs "
        "/ STTS FLOPs from the analytic matmul count (ViT blocks before and after the prune point with attention's "
        "quadratic term over the segments actually used, connector, LLM with its attention, lm_head, scorer), with "
        "the kept units of a real forward. 'As executed' counts what the implementation runs (LLaVA-OneVision: packed "
        "rows of the full frame length, projector on every patch). Like FlopCounterMode, the count holds matrix "
        "products only: norms, activations, RoPE, softmax and kernel efficiency (e.g. the slow CPU Conv3d patch "
        "embedding, a fixed cost) are outside the ideal.",
        "- generate: `generate(max_new_tokens=16, min_new_tokens=16, do_sample=False)`, prompt without the answer.",
        "- train, scorer only: `STTSConfig(train_base_model=False)`; the baseline is the frozen bare model "
        "back-propagating from the loss to the output of ViT block prune_layer (the path the scorer's gradient "
        "takes). train, whole model: `train_base_model=True`. Step = forward + backward + zero_grad, no optimizer.",
        "- peak memory: "
        + (
            "increase of `torch.cuda.max_memory_allocated` during the first whole-model training step in a fresh "
            "process, baseline vs STTS"
            if settings["device"].startswith("cuda")
            else "increase of the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs just before; ru_maxrss "
            "elsewhere) during the first whole-model training step in a fresh process (forkserver), baseline vs STTS"
        )
        + ".",
        "- scorer: the scoring step alone (unit gathering, scorer, aux loss, key bias, selection) on block "
        "prune_layer's output, as a share of the baseline forward / of the baseline whole-model training step (with "
        "its backward). 'STTS at ratio 0' is a full STTS forward pruning nothing, against the baseline.",
        "",
    ]
    for name in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == name]
        lines += [f"#### {FAMILIES[name].description}", "", *speedup_table(rows), "", "Targets:", ""]
        lines += [*target_lines(rows, settings["main_ratio"]), "", "Times, baseline -> STTS:", ""]
        lines += [*times_table(rows), "", "FLOPs (FlopCounterMode with the math SDPA backend):", ""]
        lines += [*flop_check_table(rows), ""]
    return "\n".join(lines)


def plot_panel(axis: Any, rows: list[dict], kind: str) -> None:
    """One family's speed-up of one kind vs frames: per ratio, measured (solid) and ideal (dashed, same colour)."""
    for index, ratio in enumerate(sorted({r["prune_ratio"] for r in rows})):
        points = sorted((r["frames"], r[kind]["speedup"], r[kind]["ideal"]) for r in rows if r["prune_ratio"] == ratio)
        frames, measured, ideal = zip(*points)
        axis.plot(frames, measured, "o-", color=f"C{index}", label=f"{ratio:.0%} measured")
        axis.plot(frames, ideal, "--", color=f"C{index}", marker="x", alpha=0.7, label=f"{ratio:.0%} ideal")
    ticks = sorted({r["frames"] for r in rows})
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.axhline(1.0, color="grey", linewidth=0.5)
    axis.set_title(f"{rows[0]['family']}: {KIND_TITLES[kind]}", fontsize=9)
    axis.set_xlabel("frames")
    axis.set_ylabel("speed-up")
    axis.grid(alpha=0.3)


def plot(results: list[dict], path: str) -> None:
    """Speed-up vs frames, a row of panels per family, a panel per measurement kind."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in results))
    figure, axes = plt.subplots(len(families), len(KINDS), figsize=(4 * len(KINDS), 3.4 * len(families)), squeeze=False)
    for row_axes, name in zip(axes, families):
        for axis, kind in zip(row_axes, KINDS):
            plot_panel(axis, [r for r in results if r["family"] == name], kind)
        row_axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(results: list[dict], settings: dict[str, Any], out: str) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    text = markdown(results, settings)
    with open(os.path.join(out, "speed.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(out, "speed.png"))
    return text


# ================================================================================================ profiling
CONTAINERS = {"forward", "_prune_inputs", "encode_videos", "run_block", "_forward_frames", "__call__"}


def library_time_table(profile: cProfile.Profile, limit: int = 15) -> list[str]:
    """Cumulative time of the library's functions (stts_adapter, model_registry) in a cProfile run, leaving out the
    ones that contain the base model's own work (`CONTAINERS`)."""
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, primitive calls, tottime, cumtime, ...)}
    rows = [
        (cumtime, calls, f"{os.path.basename(path)}:{function}")
        for (path, _, function), (_, calls, _, cumtime, _) in stats.items()
        if ("stts_adapter" in path or "model_registry" in path) and function not in CONTAINERS
    ]
    return [
        f"  {cumtime * 1000:8.1f} ms  {calls:4d} calls  {name}" for cumtime, calls, name in sorted(rows)[::-1][:limit]
    ]


def op_times(run: Callable[[], object]) -> dict[str, tuple[float, int]]:
    """{aten op: (self CPU ms, calls)} of one run under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}


def op_table(baseline: dict, stts: dict, limit: int = 18) -> list[str]:
    """Ops by STTS self time next to the baseline's: ops far above the baseline's share are STTS overhead."""
    lines = [f"  {'op':58s} {'baseline ms':>12s} {'STTS ms':>9s} {'calls b/s':>11s}"]
    for name, (ms, calls) in sorted(stts.items(), key=lambda item: -item[1][0])[:limit]:
        base_ms, base_calls = baseline.get(name, (0.0, 0))
        lines.append(f"  {name[:58]:58s} {base_ms:12.1f} {ms:9.1f} {base_calls:5d}/{calls:<5d}")
    return lines


def profile_family(family: Family, args: argparse.Namespace) -> None:
    """Time, cProfile and torch.profiler one STTS forward and one whole-model training step, against the bare model."""
    frames, ratio = args.frames[0], args.ratios[0]
    config = family.make_config(args.size)
    model = rewrap(new_model(family, config, args), train_base_model=True)
    model.set_prune_ratio(ratio)
    batch = family.batch(config, frames, args.size, answer=True, device=args.device)
    for kind, training in (("forward", False), ("training step, whole model", True)):
        model.train(training)
        step = train_step(model, batch) if training else forward_step(model, batch)
        base_s, (stts_s,) = alternate(bare(model, step), [step], args.repeats)
        profile = cProfile.Profile()
        profile.runcall(step)
        print(
            f"\n=== {family.name}, {frames} frames, {ratio:.0%}, {kind}: baseline {base_s * 1000:.0f} ms, STTS "
            f"{stts_s * 1000:.0f} ms ({base_s / stts_s:.2f}x)"
        )
        print("library functions (cumulative, cProfile, base-model containers left out):")
        print("\n".join(library_time_table(profile)))
        print("aten ops (self CPU time, torch.profiler):")
        print("\n".join(op_table(op_times(bare(model, step)), op_times(step))))
    model.unload()


# ================================================================================================ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    parser.add_argument("--main-ratio", type=float, default=0.5, help="the ratio measured at every frame count")
    # 64 frames cost about as much as 8, 16 and 32 together: the default measures them at the main ratio only, with
    # --long-repeats, which keeps the default run near 20 min on 2 cores (the full grid: ~25 min).
    parser.add_argument(
        "--all-ratios-at",
        type=int,
        nargs="+",
        default=[8, 16, 32],
        help="frame counts at which every --ratios value runs; the others run --main-ratio only",
    )
    parser.add_argument("--prune-layer", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (medians reported)")
    parser.add_argument("--long-from", type=int, default=64, help="frame counts from which --long-repeats applies")
    parser.add_argument("--long-repeats", type=int, default=2, help="at most this many repeats there")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default 224; --quick: 112)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (timings synchronize; memory from CUDA)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument("--no-flop-check", dest="flop_check", action="store_false", help="skip FlopCounterMode")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 8 frames of 112 px, one ratio, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="profile frames[0], ratios[0] instead of benchmarking")
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.ratios, args.main_ratio, args.repeats, args.long_repeats = [8], [0.5], 0.5, 1, 1
    if args.size is None:
        args.size = 112 if args.quick else 224
    if args.main_ratio not in args.ratios:
        args.ratios = sorted({*args.ratios, args.main_ratio})
    return args


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    cases = len(args.frames) * len(args.family) * 2
    with tqdm(total=cases, desc="benchmark") as progress:
        results = [row for name in args.family for row in benchmark_family(FAMILIES[name], args, progress)]
    if args.memory:
        jobs = list(
            dict.fromkeys((r["family"], r["frames"], ratio) for r in results for ratio in (None, r["prune_ratio"]))
        )
        attach_memory(results, measure_memory(jobs, args))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        for name in args.family:
            profile_family(FAMILIES[name], args)
        return
    start = time.perf_counter()
    results = run_benchmark(args)
    settings = {
        "machine": machine_name(args.threads, args.device),
        "device": args.device,
        "size": args.size,
        "prune_layer": args.prune_layer,
        "main_ratio": args.main_ratio,
        "threads": args.threads,
        "seconds": time.perf_counter() - start,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    print(write_outputs(results, settings, args.out))
    print(f"Wrote speed.json, speed.md, speed.png to {args.out} in {settings['seconds']:.0f} s.")


if __name__ == "__main__":
    main()
