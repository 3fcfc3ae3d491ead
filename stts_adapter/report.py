"""`out.stts`: what one call of an STTS model pruned."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .sequence import SequencePruning

SATURATION = 1e-4
"""A score within this distance of 0 or 1 is saturated: the sigmoid's slope there is below 1/2500 of its peak, so
almost no gradient flows back through it."""
SATURATED_LOGIT = math.log((1 - SATURATION) / SATURATION)  # |logit| above it: a saturated score (about 9.21)


@dataclass
class STTSReport:
    """What one forward / generate call pruned.

    Attributes:
        units_before (`list[int]`): pruning units (= LLM tokens) of each video before pruning.
        units_after (`list[int]`): units kept per video.
        keep_masks (`list[torch.Tensor]`): per video, a `(frames, units_per_frame)` bool mask of kept units.
        scores (`list[torch.Tensor]`): per video, the `(frames, units_per_frame)` scores that chose them (detached).
        logits (`list[torch.Tensor]`, *optional*): per video, the scorer's `(frames, units_per_frame)` logits
            (detached; method "scorer" only). Selection ranks by them.
        aux_loss (`torch.Tensor`, *optional*): the temporal auxiliary loss of this call (method "scorer", training
            mode only: it is a term of the training loss, and eval mode skips its cost).
        logit_penalty (`torch.Tensor`, *optional*): mean(max(|logit| - logit_penalty_margin, 0)^2) over the
            scorer's logits (method "scorer", training mode only); `out.loss` holds `logit_penalty_weight` x it.
        lm_loss (`torch.Tensor`, *optional*): the LM loss alone, when labels were given.
        sequence (`SequencePruning`, *optional*): how the token sequences shrank; `prune_like` applies it to other
            tensors. None for a ViT without a language model.
    """

    units_before: list[int]
    units_after: list[int]
    keep_masks: list[torch.Tensor]
    scores: list[torch.Tensor]
    aux_loss: torch.Tensor | None
    sequence: SequencePruning | None
    lm_loss: torch.Tensor | None = None
    logits: list[torch.Tensor] | None = None
    logit_penalty: torch.Tensor | None = None

    @property
    def saturated_fraction(self) -> float | None:
        """Fraction of the scorer's scores within `SATURATION` (1e-4) of 0 or 1, where the sigmoid passes almost no
        gradient back; None without a learned scorer. A healthy run keeps it near 0."""
        if not self.logits:
            return None
        logits = torch.cat([x.flatten() for x in self.logits]).float()
        if not logits.numel():
            return None
        return float((logits.abs() > SATURATED_LOGIT).float().mean())

    @property
    def kept_fraction(self) -> float:
        """Kept units over all units of the call's videos."""
        return sum(self.units_after) / max(1, sum(self.units_before))

    @property
    def attention_mask(self) -> torch.Tensor:
        """`(batch, pruned_seq)` attention mask of the pruned sequence the LLM saw (aligns with `out.logits`)."""
        return self._sequence().attention_mask

    @property
    def keep_tokens(self) -> torch.Tensor:
        """`(batch, seq)` bool, in the unpruned layout: True at the real tokens the LLM saw."""
        return self._sequence().keep_tokens

    def _sequence(self) -> SequencePruning:
        if self.sequence is None:
            raise AttributeError("This call had no language model: no token sequence was pruned (see keep_masks).")
        return self.sequence

    def prune_like(self, tensor: torch.Tensor, pad_value: float | int) -> torch.Tensor:
        """Prune any `(..., batch, seq)` per-token tensor (e.g. your own labels) exactly as the inputs were.

        Args:
            tensor (`torch.Tensor`): in the unpruned layout.
            pad_value: fill value at the pruned batch's padding.

        Returns:
            `torch.Tensor` aligned with `out.logits`.
        """
        return self._sequence().prune(tensor, pad_value)
