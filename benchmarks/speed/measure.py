"""Timing (`timed`, `round_robin`, `alternate`, `median_seconds`) and the steps it times: a forward, `generate`, a
training step, the scoring step alone, each on the STTS model, on the bare model (`bare`) or at a prune ratio
(`with_ratio`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import nn

from benchmarks.speed.kinds import NEW_TOKENS
from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.runtime import VisionPruningPass

T = TypeVar("T")


def synchronize() -> None:
    """Wait for queued GPU work, so that a timing covers it (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(run: Callable[[], object]) -> float:
    """Seconds `run()` takes (GPU work included)."""
    synchronize()
    start = time.perf_counter()
    run()
    synchronize()
    return time.perf_counter() - start


def round_robin(
    runs: Sequence[Callable[[], object]], repeats: int, measure: Callable[[Callable[[], object]], T] = timed
) -> list[list[T]]:
    """`repeats` measurements of every run, taken round-robin (run 1, run 2, ..., run 1, ...) after one warm-up of
    each, so that a drift in the machine's speed hits them all alike.

    Args:
        runs (`Sequence[Callable]`): what to measure.
        repeats (`int`): rounds.
        measure (`Callable`): takes a run, returns its measurement (default: `timed`, seconds).

    Returns:
        `list[list]`: per run, its measurements in round order.
    """
    for run in runs:
        run()
    samples: list[list[T]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, taken in zip(runs, samples):
            taken.append(measure(run))
    return samples


def alternate(
    baseline: Callable[[], object], variants: Sequence[Callable[[], object]], repeats: int
) -> tuple[list[float], list[list[float]]]:
    """Seconds of every round of the baseline and of every variant, measured round-robin (`round_robin`): the
    baseline's, and each variant's."""
    baseline_runs, *variant_runs = round_robin([baseline, *variants], repeats)
    return baseline_runs, variant_runs


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median of `repeats` timed runs after one warm-up."""
    return statistics.median(round_robin([run], repeats)[0])


def vision_block(model: STTSModel, index: int) -> nn.Module:
    """ViT block `index` of the base model."""
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


def ratio_variants(model: STTSModel, ratios: Sequence[float], run: Callable[[], object]) -> list[Callable[[], object]]:
    """`run` at each of `ratios`."""
    return [with_ratio(model, ratio, run) for ratio in ratios]


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
    """An inference forward on `batch` (no grad)."""

    def run() -> object:
        with torch.no_grad():
            return model(**batch)

    return run


def generate_step(model: STTSModel, prompt: dict) -> Callable[[], object]:
    """`generate` of NEW_TOKENS tokens after `prompt`, greedy."""

    def run() -> object:
        return model.generate(**prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    return run


def train_step(model: STTSModel, batch: dict) -> Callable[[], object]:
    """A training step on `batch`: forward, backward, zero_grad (no optimizer)."""

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
    unit gathering, scorer, key bias, selection, and in training the temporal aux loss and the scorer's backward)."""
    entry, base = model.architecture, model.transformers_model
    hidden = block_output(model, batch, model.stts_config.prune_layer)
    layout = entry.video_layout(base, batch)
    tokens = entry.vision_tokens(base, batch, layout)

    def run() -> None:
        settings = replace(model.pruning_settings(), training=training)
        vision_pass = VisionPruningPass(entry, settings, model.scorer, layout, tokens)
        with torch.set_grad_enabled(training):
            vision_pass.score(hidden)
            if training:
                (vision_pass.aux_loss + vision_pass.token_bias.sum()).backward()
                model.zero_grad(set_to_none=True)

    return run
