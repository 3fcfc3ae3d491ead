"""Running the ViT densely after pruning.

Two layouts, one bookkeeping (`TokenUnits`: which unit every ViT token belongs to):

- Varlen (`VarlenTokens`): a packed ViT sequence (Qwen-style) keeps running as one sequence; the pruned units'
  tokens are removed and every attention segment (a frame, a window) is re-measured.
- Row packing (`FrameTokens` -> `RowPacking`): a ViT that runs frames as a batch `(frames, tokens, dim)` gets the
  kept tokens of its frames packed first-fit-decreasing into rows of the original frame length, with a
  block-diagonal mask so a token only sees its own frame; outputs the connector reads are scattered back.

Either way attention per frame is exactly the unpruned model's on the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class TokenUnits:
    """Unit membership of the ViT's tokens, in flat token order.

    Args:
        token_unit (`torch.Tensor` of shape `(num_tokens,)`): unit (flat video layout) of every token, -1 for tokens
            that are never pruned (e.g. CLS / register tokens).
        num_units (`int`): units in the layout.
    """

    token_unit: torch.Tensor
    num_units: int

    def unit_token_index(self) -> torch.Tensor:
        """`(num_units, max_patches_per_unit)`: token positions of every unit in token order, -1 where a unit has
        fewer patches than the largest one."""
        positions = torch.nonzero(self.token_unit >= 0).squeeze(1)
        units, order = torch.sort(self.token_unit[positions], stable=True)
        positions = positions[order]
        counts = torch.bincount(units, minlength=self.num_units)
        first = F.pad(counts.cumsum(0), (1, 0))[:-1]
        rank = torch.arange(len(units), device=units.device) - first[units]
        index = torch.full((self.num_units, int(counts.max())), -1, dtype=torch.long, device=units.device)
        index[units, rank] = positions
        return index

    def gather_units(self, flat_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch vectors of every unit.

        Args:
            flat_hidden (`torch.Tensor` of shape `(num_tokens, dim)`).

        Returns:
            unit_patches (`torch.Tensor` of shape `(num_units, max_patches, dim)`): zeros in padding slots.
            patch_mask (`torch.Tensor` of shape `(num_units, max_patches)`, bool): False in padding slots.
        """
        index = self.unit_token_index()
        patch_mask = index >= 0
        unit_patches = flat_hidden[index.clamp(min=0)] * patch_mask.unsqueeze(-1).to(flat_hidden.dtype)
        return unit_patches, patch_mask

    def per_token(self, per_unit: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Spread a `(num_units,)` value to every token (tokens outside units get `fill`)."""
        values = per_unit[self.token_unit.clamp(min=0)]
        return torch.where(self.token_unit >= 0, values, torch.full_like(values, fill))

    def keep_token(self, keep_units: torch.Tensor) -> torch.Tensor:
        """`(num_tokens,)` bool: tokens that stay (outside units, or in a kept unit)."""
        return (self.token_unit < 0) | keep_units[self.token_unit.clamp(min=0)]


@dataclass
class VarlenTokens(TokenUnits):
    """A packed ViT sequence: unit membership and attention segments.

    Args:
        segments (`dict[str, torch.Tensor]`): per attention kind (e.g. "frame", "window"), the segment of every
            token; tokens of one segment are contiguous and segment ids increase along the sequence.
        block_segments (`tuple[str, ...]`): for every ViT block, the segment kind its attention stays within.
    """

    segments: dict[str, torch.Tensor] = field(default_factory=dict)
    block_segments: tuple[str, ...] = ()

    def prune(self, keep_units: torch.Tensor) -> PrunedVarlen:
        """Drop the tokens of pruned units and re-measure every segment.

        Args:
            keep_units (`torch.Tensor` of shape `(num_units,)`, bool).

        Returns:
            `PrunedVarlen`
        """
        kept_tokens = torch.nonzero(self.keep_token(keep_units)).squeeze(1)
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


@dataclass
class FrameTokens(TokenUnits):
    """A ViT that runs frames as a batch: token `i` of the flat `(frames * tokens_per_frame)` order is token
    `i % tokens_per_frame` of frame `i // tokens_per_frame`.

    Args:
        tokens_per_frame (`int`): sequence length N of one frame (prefix tokens included).
    """

    tokens_per_frame: int = 0

    def prune(self, keep_units: torch.Tensor) -> RowPacking:
        """Pack the kept tokens of every frame into rows of `tokens_per_frame` slots (first-fit decreasing)."""
        return RowPacking.build(self.keep_token(keep_units), self.tokens_per_frame)


@dataclass
class RowPacking:
    """Kept tokens of frames-as-batch hidden states, packed into rows of the original frame length.

    Args:
        source (`torch.Tensor` of shape `(rows, tokens_per_frame)`): flat token position held by every slot (0 in
            padding slots).
        valid (`torch.Tensor` of shape `(rows, tokens_per_frame)`, bool): False in padding slots.
        frame (`torch.Tensor` of shape `(rows, tokens_per_frame)`): frame of every slot, -1 in padding slots.
        num_frames (`int`): frames of the unpacked layout.
        extras (`dict`): family-specific state.
    """

    source: torch.Tensor
    valid: torch.Tensor
    frame: torch.Tensor
    num_frames: int
    extras: dict = field(default_factory=dict)

    @classmethod
    def build(cls, keep_token: torch.Tensor, tokens_per_frame: int) -> RowPacking:
        """First-fit-decreasing packing of every frame's kept tokens.

        Args:
            keep_token (`torch.Tensor` of shape `(frames * tokens_per_frame,)`, bool): the tokens that stay.
            tokens_per_frame (`int`): row capacity.
        """
        device = keep_token.device
        keep = keep_token.view(-1, tokens_per_frame)
        num_frames = keep.shape[0]
        lengths = keep.sum(dim=1).tolist()
        row_of_frame, offset_of_frame, free = [0] * num_frames, [0] * num_frames, []
        for frame in sorted(range(num_frames), key=lambda f: -lengths[f]):
            row = next((r for r, space in enumerate(free) if space >= lengths[frame]), len(free))
            if row == len(free):
                free.append(tokens_per_frame)
            row_of_frame[frame], offset_of_frame[frame] = row, tokens_per_frame - free[row]
            free[row] -= lengths[frame]

        kept = torch.nonzero(keep_token).squeeze(1)  # frame-major, in token order within a frame
        frame_of_kept = kept // tokens_per_frame
        first_of_frame = F.pad(keep.sum(dim=1).cumsum(0), (1, 0))[:-1]
        rank = torch.arange(len(kept), device=device) - first_of_frame[frame_of_kept]
        row = torch.tensor(row_of_frame, device=device)[frame_of_kept]
        slot = torch.tensor(offset_of_frame, device=device)[frame_of_kept] + rank
        shape = (len(free), tokens_per_frame)
        source = torch.zeros(shape, dtype=torch.long, device=device)
        valid = torch.zeros(shape, dtype=torch.bool, device=device)
        frame = torch.full(shape, -1, dtype=torch.long, device=device)
        source[row, slot], valid[row, slot], frame[row, slot] = kept, True, frame_of_kept
        return cls(source=source, valid=valid, frame=frame, num_frames=num_frames)

    @property
    def num_rows(self) -> int:
        return self.source.shape[0]

    def pack(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(frames, tokens_per_frame, ...)` -> `(rows, tokens_per_frame, ...)` (padding slots hold token 0)."""
        return hidden_states.flatten(0, 1)[self.source]

    def unpack(self, packed: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Scatter packed rows back to `(frames, tokens_per_frame, ...)`; pruned tokens take their value in `fill`."""
        flat = fill.flatten(0, 1).index_put((self.source[self.valid],), packed[self.valid])
        return flat.view(fill.shape)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`(rows, 1, tokens_per_frame, tokens_per_frame)` additive mask: 0 between tokens of the same frame (and
        between a row's padding slots, so no query is left without keys), the dtype's minimum elsewhere."""
        same_frame = self.frame[:, :, None] == self.frame[:, None, :]
        mask = torch.zeros(same_frame.shape, dtype=dtype, device=self.frame.device)
        return mask.masked_fill(~same_frame, torch.finfo(dtype).min)[:, None]
