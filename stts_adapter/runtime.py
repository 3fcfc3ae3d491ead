"""One forward of the ViT with pruning: scores at block k, key bias in block k+1, pruning after it.

The state of a call lives in a `VisionPruningPass` that is active only inside `with pass_.active():`. It is held in a
context variable, never on a module, so concurrent calls (threads) on one model cannot see each other's state and a
model used outside a pass (e.g. `disable_stts`, or images) is exactly the base model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import logit_penalty, temporal_aux_loss
from .packing import PrunedVarlen, RowPacking, TokenUnits
from .registry import ArchitectureEntry
from .scorer import STTSScorer, soft_key_bias
from .selection import VideoLayout, random_scores, select_units, similarity_scores

_ACTIVE_PASS: ContextVar[VisionPruningPass | None] = ContextVar("stts_active_pass", default=None)


def active_pass() -> VisionPruningPass | None:
    """The pass running in this thread / context, if any."""
    return _ACTIVE_PASS.get()


@dataclass(frozen=True)
class PruningSettings:
    """The config values one call uses, read once at its start (so a concurrent `set_prune_ratio` cannot change
    a call half-way)."""

    prune_ratio: float
    prune_layer: int
    method: str
    bias_min: float
    keep_first_frame: bool
    detach_aux_target: bool
    aux_loss: str
    logit_penalty_margin: float
    key_bias: bool
    score_gate: bool
    seed: int
    training: bool


class VisionPruningPass:
    """Everything one ViT forward needs to prune a batch of videos, and what it found.

    Args:
        entry (`ArchitectureEntry`): the model family.
        settings (`PruningSettings`): the config values of this call.
        scorer (`STTSScorer`, *optional*): required for the "scorer" method.
        layout (`VideoLayout`): the batch's videos.
        tokens (`TokenUnits`): the family's token bookkeeping (`VarlenTokens` or `FrameTokens`).
        capture_blocks (`tuple[int, ...]`): blocks whose outputs the family reads afterwards (in `captured`, in the
            unpruned layout).
        last_block (`int`, *optional*): blocks after it are skipped (nothing reads them).
        restore_block (`int`, *optional*): its output is scattered back to the unpruned layout, for a model whose
            own code reads the ViT's last output (a classifier head, a vision tower's pooler).

    Attributes set while the ViT runs:
        scores (`(num_units,)`), logits (`(num_units,)`, method "scorer" only), keep (`(num_units,)` bool), aux_loss
        and logit_penalty (scalars or None), pruned (family state after pruning), captured (`{block: output}`),
        attention_mask (for the block running now, when its family hands the mask to the block's self-attention
        rather than to the block).
    """

    def __init__(
        self,
        entry: ArchitectureEntry,
        settings: PruningSettings,
        scorer: STTSScorer | None,
        layout: VideoLayout,
        tokens: TokenUnits,
        capture_blocks: tuple[int, ...] = (),
        last_block: int | None = None,
        restore_block: int | None = None,
    ) -> None:
        self.entry, self.settings, self.scorer, self.layout, self.tokens = entry, settings, scorer, layout, tokens
        self.capture_blocks, self.last_block, self.restore_block = capture_blocks, last_block, restore_block
        self.scores: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None
        self.logit_penalty: torch.Tensor | None = None
        self.token_bias: torch.Tensor | None = None
        self.token_gate: torch.Tensor | None = None
        self.pruned: PrunedVarlen | RowPacking | None = None
        self.captured: dict[int, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None

    @functools.cached_property
    def prunes_units(self) -> bool:
        """Whether the selection dropped any unit (False at prune ratio 0, or when every frame keeps all its units).
        Read after `score`, which sets `keep` once per pass; cached (on GPU each read would be a device sync)."""
        return not bool(self.keep.all())

    @contextlib.contextmanager
    def active(self) -> Iterator[VisionPruningPass]:
        token = _ACTIVE_PASS.set(self)
        try:
            yield self
        finally:
            _ACTIVE_PASS.reset(token)

    # -------------------------------------------------------------------------------------------- block dispatch
    def run_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        """Run ViT block `index` (`block` is the original module) as its role in the method requires."""
        k = self.settings.prune_layer
        self.attention_mask = None  # set again by the entry for the blocks that need one
        if self.last_block is not None and index > self.last_block:
            return args[0]  # nothing downstream reads this block
        if index <= k:
            output = block(*args, **kwargs)
            if index == k:
                self.score(_hidden_states(output))
            self._capture(index, output)
            return output
        if index == k + 1:
            if self.token_bias is not None:
                args, kwargs = self.entry.biased_block_inputs(self, args, kwargs, self.token_bias)
            output = block(*args, **kwargs)
            self._capture(index, output)
            if self.token_gate is not None:
                output = _scaled(output, self.token_gate)
            hidden_states, self.pruned = self.entry.prune_tokens(self, output, kwargs)
            return output if index == self.restore_block else hidden_states
        if self.pruned is None:
            raise RuntimeError(f"ViT block {index} ran before block {k + 1}; STTS needs the blocks in order.")
        args, kwargs = self.entry.pruned_block_inputs(self, index, args, kwargs)
        output = block(*args, **kwargs)
        if index in self.capture_blocks or index == self.restore_block:
            restored = self.entry.unpack_output(self, _hidden_states(output))
            self._capture(index, restored)
            if index == self.restore_block:
                return restored
        return output

    def run_connector(self, connector: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.pruned is None:  # it reads a block before the pruning point (e.g. a DeepStack merger): every token
            return connector(*args, **kwargs)
        return self.entry.run_connector(self, connector, args, kwargs)

    def _capture(self, index: int, output: Any) -> None:
        if index in self.capture_blocks:
            self.captured[index] = _hidden_states(output)

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, hidden_states: torch.Tensor) -> None:
        """Score the units in block prune_layer's output and choose the kept ones: sets `scores`, `keep` and, with
        the learned scorer, `logits`, the key bias of the next block and, in training mode, `aux_loss` and
        `logit_penalty`.

        Args:
            hidden_states (`torch.Tensor`): the block's output, `(..., vit_hidden)` in the ViT's token order.
        """
        settings, layout = self.settings, self.layout
        unit_patches, patch_mask = self.tokens.gather_units(hidden_states.reshape(-1, hidden_states.shape[-1]))
        previous_unit = layout.previous_unit.to(unit_patches.device)
        if settings.method == "scorer":
            # Selection sorts the logits: they rank units like the scores, without the ties of a saturated sigmoid
            # (sorting tied scores would fall back to the units' positions).
            self.logits = ranking = self.scorer(unit_patches, previous_unit, patch_mask, output_logits=True)
            scores = torch.sigmoid(ranking)
            if settings.training:  # only the training loss holds them; eval skips their cost
                self.aux_loss = temporal_aux_loss(
                    ranking, unit_patches, previous_unit, settings.detach_aux_target, settings.aux_loss
                )
                self.logit_penalty = logit_penalty(ranking, settings.logit_penalty_margin)
        elif settings.method == "similarity":
            scores = ranking = similarity_scores(unit_patches.detach(), layout)
        else:
            seed = None if settings.training else settings.seed
            scores = ranking = random_scores(layout, seed, device=unit_patches.device)
        self.scores = scores
        self.keep = select_units(ranking, layout, settings.prune_ratio, settings.keep_first_frame)
        if self.logits is not None:
            if settings.key_bias:
                self.token_bias = self._key_bias(self.logits)
            if settings.score_gate and self.logits.requires_grad:
                # Worth exactly 1: the kept units' hidden states are unchanged, and the LM loss reaches each kept
                # unit's logit with d(loss)/d(gate), how much the unit's features lower the loss (gradient x input).
                gate = 1.0 + (self.logits - self.logits.detach())
                self.token_gate = self.tokens.per_token(gate, fill=1.0)

    def _key_bias(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The per-token soft key bias of block k+1, in the frames that lose units (None when no unit is pruned).

        A frame that keeps every unit (a first frame, every frame at prune ratio 0) runs block k+1 exactly as the
        base model: nothing is pruned there for the bias to anticipate.
        """
        if not self.prunes_units:
            return None
        layout = self.layout
        frame_of_unit = layout.frame_of_unit.to(logits.device)
        frame_loses_units = torch.zeros(layout.num_frames, dtype=torch.bool, device=logits.device)
        frame_loses_units[frame_of_unit[~self.keep]] = True
        unbiased = ~frame_loses_units[frame_of_unit]  # first frames too
        unit_bias = soft_key_bias(logits, frame_of_unit, unbiased, self.settings.bias_min)
        return self.tokens.per_token(unit_bias)


def _scaled(block_output: Any, token_gate: torch.Tensor) -> Any:
    """A block's output with every token's hidden state multiplied by its gate (`token_gate` in flat token order)."""
    hidden = _hidden_states(block_output)
    scaled = hidden * token_gate.to(hidden.dtype).view(*hidden.shape[:-1], 1)
    return (scaled, *block_output[1:]) if isinstance(block_output, tuple) else scaled


def _hidden_states(block_output: Any) -> torch.Tensor:
    return block_output[0] if isinstance(block_output, tuple) else block_output
