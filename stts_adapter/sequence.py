"""LLM-side surgery: remove the placeholders of pruned units from every per-token tensor of a batch.

Text and special tokens always stay. Rows get shorter by different amounts, so the batch is re-padded on the side
it was padded on before (left-padded stays left-padded: each row's last position is its last real token, as
generation expects). Positions are gathered like any other per-token tensor, so every kept token keeps its
original position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import STTSInputError


def pad_token_id(config) -> int:
    """The pad token id of a (possibly composite) model config: its language model's first (a composite config's
    top-level value can be a deprecated default outside the vocabulary); 0 if it has none."""
    for candidate in (getattr(config, "text_config", None), config):
        if getattr(candidate, "pad_token_id", None) is not None:
            return candidate.pad_token_id
    return 0


def infer_padding_side(attention_mask: torch.Tensor | None) -> str | None:
    """ "left" or "right" if the batch is padded on that side, None if it holds no padding."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return "left" if bool((attention_mask[:, 0] == 0).any()) else "right"


@dataclass
class SequencePruning:
    """How one batch's token sequences shrink.

    Args:
        keep_tokens (`torch.Tensor` of shape `(batch, seq)`, bool): real tokens that stay, in the unpruned layout.
        source_index (`torch.Tensor` of shape `(batch, pruned_seq)`): unpruned column of every pruned position.
        is_real (`torch.Tensor` of shape `(batch, pruned_seq)`, bool): False at padding.
        padding_side (`str`): side the pruned batch is padded on.
    """

    keep_tokens: torch.Tensor
    source_index: torch.Tensor
    is_real: torch.Tensor
    padding_side: str

    @property
    def attention_mask(self) -> torch.Tensor:
        """`(batch, pruned_seq)` attention mask of the pruned batch."""
        return self.is_real.long()

    def prune(self, tensor: torch.Tensor, pad_value: float | int) -> torch.Tensor:
        """Apply the pruning to any per-token tensor.

        Args:
            tensor (`torch.Tensor` of shape `(..., batch, seq)`): e.g. input ids, labels, `(3, batch, seq)` M-RoPE
                positions.
            pad_value: value at the new padding positions.

        Returns:
            `torch.Tensor` of shape `(..., batch, pruned_seq)`.
        """
        if tensor.shape[-2:] != self.keep_tokens.shape:
            raise STTSInputError(
                f"A per-token tensor of shape {tuple(tensor.shape)} does not match input_ids "
                f"{tuple(self.keep_tokens.shape)}; every per-token input must have input_ids' (batch, seq) shape."
            )
        index = self.source_index.to(tensor.device).expand(*tensor.shape[:-2], -1, -1)
        gathered = torch.gather(tensor, -1, index)
        return gathered.masked_fill(~self.is_real.to(tensor.device), pad_value)


def plan_sequence_pruning(
    placeholder_mask: torch.Tensor,
    placeholder_keep: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    default_padding_side: str = "left",
) -> SequencePruning:
    """Decide where every kept token of a batch goes.

    Args:
        placeholder_mask (`torch.Tensor` of shape `(batch, seq)`, bool): the prunable placeholder tokens.
        placeholder_keep (`torch.Tensor` of shape `(num_placeholders,)`, bool): keep flag of each placeholder, in
            row-major order (the order the model scatters features into placeholders).
        attention_mask (`torch.Tensor` of shape `(batch, seq)`, *optional*): 0 at padding.
        default_padding_side (`str`): side to pad on when the batch had no padding.

    Returns:
        `SequencePruning`
    """
    batch, _ = placeholder_mask.shape
    device = placeholder_mask.device
    real = torch.ones_like(placeholder_mask) if attention_mask is None else attention_mask.to(device).bool()
    keep = real.clone()
    keep[placeholder_mask] = placeholder_keep.to(device) & real[placeholder_mask]
    counts = keep.sum(dim=1)  # (B,)
    pruned_length = int(counts.max()) if batch else 0
    padding_side = infer_padding_side(attention_mask) or default_padding_side

    row, column = torch.nonzero(keep, as_tuple=True)  # row-major: columns ascend within a row
    rank = keep.long().cumsum(dim=1)[row, column] - 1
    target = rank + (pruned_length - counts[row]) if padding_side == "left" else rank
    source_index = torch.zeros(batch, pruned_length, dtype=torch.long, device=device)
    is_real = torch.zeros(batch, pruned_length, dtype=torch.bool, device=device)
    source_index[row, target] = column
    is_real[row, target] = True
    return SequencePruning(keep_tokens=keep, source_index=source_index, is_real=is_real, padding_side=padding_side)
