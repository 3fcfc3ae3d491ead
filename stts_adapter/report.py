"""`out.stts`: what one call of an STTS model pruned."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sequence import SequencePruning


@dataclass
class STTSReport:
    """What one forward / generate call pruned.

    Attributes:
        units_before (`list[int]`): pruning units (= LLM tokens) of each video before pruning.
        units_after (`list[int]`): units kept per video.
        keep_masks (`list[torch.Tensor]`): per video, a `(frames, units_per_frame)` bool mask of kept units.
        scores (`list[torch.Tensor]`): per video, the `(frames, units_per_frame)` scores that chose them (detached).
        aux_loss (`torch.Tensor`, *optional*): the temporal auxiliary loss of this call (method "scorer").
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
