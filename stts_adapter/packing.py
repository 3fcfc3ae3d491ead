"""Running the ViT densely after pruning.

Varlen: a packed ViT sequence (Qwen-style) keeps running as one sequence; the pruned units' tokens are removed and
every attention segment (a frame, a window) is re-measured, so attention semantics per segment are exactly the
unpruned model's on the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class VarlenTokens:
    """Unit membership and attention segments of a packed ViT sequence.

    Args:
        token_unit (`torch.Tensor` of shape `(num_tokens,)`): flat-layout unit of every token in ViT order, -1 for
            tokens that are never pruned.
        segments (`dict[str, torch.Tensor]`): per attention kind (e.g. "frame", "window"), the segment of every
            token; tokens of one segment are contiguous and segment ids increase along the sequence.
        patches_per_unit (`int`): tokens per unit.
        block_segments (`tuple[str, ...]`): for every ViT block, the segment kind its attention stays within.
    """

    token_unit: torch.Tensor
    segments: dict[str, torch.Tensor]
    patches_per_unit: int
    block_segments: tuple[str, ...]

    def unit_token_index(self) -> torch.Tensor:
        """`(num_units, patches_per_unit)`: where each unit's tokens sit in the sequence, in ViT order."""
        positions = torch.nonzero(self.token_unit >= 0).squeeze(1)
        order = torch.sort(self.token_unit[positions], stable=True).indices
        return positions[order].view(-1, self.patches_per_unit)

    def per_token(self, per_unit: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Spread a `(num_units,)` value to every token (tokens outside units get `fill`)."""
        values = per_unit[self.token_unit.clamp(min=0)]
        return torch.where(self.token_unit >= 0, values, torch.full_like(values, fill))

    def prune(self, keep_units: torch.Tensor) -> PrunedVarlen:
        """Drop the tokens of pruned units and re-measure every segment.

        Args:
            keep_units (`torch.Tensor` of shape `(num_units,)`, bool).

        Returns:
            `PrunedVarlen`
        """
        keep_token = (self.token_unit < 0) | keep_units[self.token_unit.clamp(min=0)]
        kept_tokens = torch.nonzero(keep_token).squeeze(1)
        cu_seqlens = {kind: _cu_seqlens(segment[kept_tokens]) for kind, segment in self.segments.items()}
        return PrunedVarlen(kept_tokens=kept_tokens, cu_seqlens=cu_seqlens, block_segments=self.block_segments)


@dataclass
class PrunedVarlen:
    """The kept part of a packed sequence.

    Args:
        kept_tokens (`torch.Tensor` of shape `(num_kept,)`): positions of the kept tokens in the unpruned sequence.
        cu_seqlens (`dict[str, torch.Tensor]`): int32 cumulative segment boundaries of the kept tokens, per kind;
            segments left empty are dropped.
        block_segments (`tuple[str, ...]`): segment kind of every ViT block.
        extras (`dict`): family-specific tensors sliced to the kept tokens (e.g. rotary tables).
    """

    kept_tokens: torch.Tensor
    cu_seqlens: dict[str, torch.Tensor]
    block_segments: tuple[str, ...]
    extras: dict = field(default_factory=dict)

    def block_cu_seqlens(self, block_index: int) -> torch.Tensor:
        """Segment boundaries block `block_index` attends within."""
        return self.cu_seqlens[self.block_segments[block_index]]

    def block_max_seqlen(self, block_index: int) -> int:
        cu_seqlens = self.block_cu_seqlens(block_index)
        return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _cu_seqlens(segment_of_token: torch.Tensor) -> torch.Tensor:
    lengths = torch.unique_consecutive(segment_of_token, return_counts=True)[1]
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`(num_tokens,)` segment index of every token, from cumulative boundaries `(num_segments + 1,)`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention inside each segment of a packed sequence, with an optional additive bias per key.

    The segments are padded into one batch so that a single `scaled_dot_product_attention` call serves them all.

    Args:
        query, key, value (`torch.Tensor` of shape `(num_tokens, heads, head_dim)`).
        cu_seqlens (`torch.Tensor` of shape `(num_segments + 1,)`): segment boundaries.
        key_bias (`torch.Tensor` of shape `(num_tokens,)`, *optional*): added to every query's logit for that key.
        scale (`float`, *optional*): softmax scale (default 1/sqrt(head_dim)).

    Returns:
        `torch.Tensor` of shape `(num_tokens, heads, head_dim)`.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    max_length = int(lengths.max())
    starts = cu_seqlens[:-1].long()
    slot = torch.arange(max_length, device=query.device)
    index = starts[:, None] + slot[None, :]  # (S, Lmax)
    valid = slot[None, :] < lengths[:, None]
    index = torch.where(valid, index, torch.zeros_like(index))

    def padded(x: torch.Tensor) -> torch.Tensor:  # (N, H, d) -> (S, H, Lmax, d)
        return x[index].transpose(1, 2)

    bias = torch.zeros_like(valid, dtype=query.dtype) if key_bias is None else key_bias.to(query.dtype)[index]
    mask = bias.masked_fill(~valid, float("-inf"))[:, None, None, :]  # (S, 1, 1, Lmax)
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid]  # (N, H, d), segments back in sequence order
