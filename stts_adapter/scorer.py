"""The STTS scorer: one score in (0, 1) per pruning unit, from the unit and the same unit one frame earlier."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import STTSConfigError

if TYPE_CHECKING:
    from .config import STTSConfig
    from .registry import VisionSpec


class UnitAttentionPool(nn.Module):
    """Pools a unit's patches into one vector: multi-head attention whose query is the mean of the patches.

    The parameters are those of an `nn.MultiheadAttention` (`attention`), and the result is its output, computed
    with the key and value projections moved to the side that has one row per unit: a head's score of patch x is
    q_h . (W_k,h x) = (W_k,h^T q_h) . x, and its output sum_p a_p (W_v,h x_p + b_v,h) = W_v,h (sum_p a_p x_p) + b_v,h
    (the weights sum to 1). So the projections run once per unit instead of once per patch; the key bias adds the
    same score to every patch of a unit and cancels in the softmax.

    Args:
        dim (`int`): patch feature size.
        num_heads (`int`): attention heads (must divide `dim`).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, unit_patches: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(num_units, patches_per_unit, dim) -> (num_units, dim); `patch_mask` (num_units, patches_per_unit) is
        False at padding slots of units smaller than the largest."""
        attention = self.attention
        units, dim, heads = unit_patches.shape[0], attention.embed_dim, attention.num_heads
        w_query, w_key, w_value = attention.in_proj_weight.view(3, heads, dim // heads, dim)  # (heads, head_dim, D)
        b_query, _, b_value = attention.in_proj_bias.view(3, heads, dim // heads)
        if patch_mask is None:
            query = unit_patches.mean(dim=1)
        else:
            weights = patch_mask.to(unit_patches.dtype).unsqueeze(-1)
            query = (unit_patches * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        query = torch.einsum("uD,hdD->uhd", query, w_query) + b_query  # (U, heads, head_dim)
        query_in_patch_space = torch.einsum("uhd,hdD->uhD", query, w_key) / math.sqrt(dim // heads)
        scores = torch.einsum("uhD,upD->uhp", query_in_patch_space, unit_patches)  # (U, heads, P)
        if patch_mask is not None:
            scores = scores.masked_fill(~patch_mask.unsqueeze(1), float("-inf"))
        mixed = torch.einsum("uhp,upD->uhD", scores.softmax(dim=-1), unit_patches)  # each head's weighted patches
        values = torch.einsum("uhD,hdD->uhd", mixed, w_value) + b_value  # (U, heads, head_dim)
        return attention.out_proj(values.reshape(units, dim))


class STTSScorer(nn.Module):
    """Scores every unit of a batch of videos.

    Each unit is pooled to a vector, concatenated with the pooled vector of the same unit in the previous frame of
    the same video (zeros on first frames) as [previous, current], and mapped by an MLP (2D -> H -> H -> 1, SiLU)
    and a sigmoid to a score. High = keep.

    Args:
        input_size (`int`): the ViT's hidden size D.
        hidden_size (`int`): the MLP width H.
        num_heads (`int`): heads of the attention pooling.
        input_norm (`bool`): read the patches through a LayerNorm without parameters (ours; the paper's scorer reads
            the residual stream as it is). The scores then do not depend on the scale of the ViT's features, which
            grows with depth and drifts when the ViT is fine-tuned, and stay finite for any input.
    """

    def __init__(self, input_size: int, hidden_size: int, num_heads: int, input_norm: bool = True) -> None:
        super().__init__()
        if input_size % num_heads:
            raise ValueError(
                f"The scorer's attention pooling needs num_heads ({num_heads}) to divide the ViT hidden size "
                f"({input_size}); set STTSConfig.scorer_num_heads to a divisor."
            )
        self.input_size, self.hidden_size, self.num_heads = input_size, hidden_size, num_heads
        self.input_norm = input_norm
        self.pool = UnitAttentionPool(input_size, num_heads)
        self.mlp = nn.Sequential(
            nn.Linear(2 * input_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, 1),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal weights with std sqrt(1 / fan_in), zero biases (the paper's init)."""
        attention = self.pool.attention
        weights = [attention.in_proj_weight, attention.out_proj.weight]
        weights += [m.weight for m in self.mlp if isinstance(m, nn.Linear)]
        for weight in weights:
            std = math.sqrt(1.0 / weight.shape[1])
            nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)
        for name, parameter in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(parameter)

    def forward(
        self,
        unit_patches: torch.Tensor,
        previous_unit: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        output_logits: bool = False,
    ) -> torch.Tensor:
        """Score the units.

        Args:
            unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, input_size)`): features of every
                unit's patches at the scored block's output, in the flat video layout.
            previous_unit (`torch.Tensor` of shape `(num_units,)`): index of the same unit one frame earlier in the
                same video, -1 on first frames.
            patch_mask (`torch.Tensor` of shape `(num_units, patches_per_unit)`, *optional*): False at padding slots
                (units of different sizes); None when every unit has all its patches.
            output_logits (`bool`): return the logits before the sigmoid instead. They rank the units like the
                scores, without the ties of a saturated sigmoid (in float32 every logit below about -17 or above
                about 17 gives the same score), so selection uses them.

        Returns:
            `torch.Tensor` of shape `(num_units,)`: scores in (0, 1) (or logits), in the scorer's dtype.
        """
        dtype = self.mlp[0].weight.dtype
        if patch_mask is not None and bool(patch_mask.all()):
            patch_mask = None  # the common case: the fast path, and exactly the unmasked computation
        unit_patches = unit_patches.to(dtype)
        if self.input_norm:
            unit_patches = _layer_norm(unit_patches)
        current = self.pool(unit_patches, patch_mask)  # (U, D)
        has_previous = (previous_unit >= 0).unsqueeze(-1)
        previous = torch.where(has_previous, current[previous_unit.clamp(min=0)], torch.zeros_like(current))
        logits = self.mlp(torch.cat([previous, current], dim=-1)).squeeze(-1)
        return logits if output_logits else torch.sigmoid(logits)


def _layer_norm(patches: torch.Tensor) -> torch.Tensor:
    """Every patch vector to zero mean and unit variance. Scaled down first (a detached factor: the LayerNorm is
    scale-invariant) so that the variance of huge activations cannot overflow."""
    patches = patches / patches.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    return F.layer_norm(patches, patches.shape[-1:], eps=1e-6)


def soft_key_bias(
    logits: torch.Tensor, frame_of_unit: torch.Tensor, is_first_frame: torch.Tensor, bias_min: float
) -> torch.Tensor:
    """log(s'), where s' is the score `sigmoid(logit)` rescaled per frame to [bias_min, 1]: the best unit of a frame
    gets 0, the worst log(bias_min). First frames, and frames whose units all score the same, get 0.

    The bias keeps its gradient: this is how the LM loss reaches the scorer. It is computed from the logits, in
    float64, in log space on the tail of the sigmoid where the frame's scores are exact (1 - s for a frame of scores
    near 1) and relative to the frame's largest, so a frame of saturated scores (in float32 every logit above about
    17 gives exactly 1.0; in float64 every logit below about -745 gives 0) still has distinct scores and passes the
    LM gradient; only a frame whose scores are equal to float64 precision counts as flat.

    As the rescaling is per frame, the bias of a frame does not change when all its scores move together (nor does
    attention, which is per frame): the LM loss orders the units within each frame. The lowest and highest units
    of a frame always get log(bias_min) and 0 and receive their gradient through the others' rescaling (a frame of
    two units has a constant bias).

    Args:
        logits (`torch.Tensor` of shape `(num_units,)`): the scorer's logits.
        frame_of_unit (`torch.Tensor` of shape `(num_units,)`): global frame index of each unit.
        is_first_frame (`torch.Tensor` of shape `(num_units,)`, bool).
        bias_min (`float`): in (0, 1].

    Returns:
        `torch.Tensor` of shape `(num_units,)`, float32, <= 0.
    """
    logits = logits.double()
    num_frames = int(frame_of_unit.max()) + 1
    upper_tail = _per_frame(logits, frame_of_unit, num_frames, "mean")[frame_of_unit] > 0
    # log min(s, 1 - s) on the tail where the frame's scores are, relative to the frame's largest: exact for any
    # logit (a float64 sigmoid underflows to 0 below about -745, which would tie the frame's scores).
    log_tail = F.logsigmoid(torch.where(upper_tail, -logits, logits))
    log_high = _per_frame(log_tail, frame_of_unit, num_frames, "amax")[frame_of_unit]
    tail = torch.exp(log_tail - log_high)  # in (0, 1]: the tail over the frame's largest tail
    low = _per_frame(tail, frame_of_unit, num_frames, "amin")[frame_of_unit]
    above_lowest = torch.where(upper_tail, 1.0 - tail, tail - low)  # (s - the frame's lowest s), same scale
    span = 1.0 - low
    flat = (span <= 1e-12) | is_first_frame
    rescaled = bias_min + (1.0 - bias_min) * above_lowest / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.zeros_like(logits), torch.log(rescaled)).float()


def _per_frame(values: torch.Tensor, frame_of_unit: torch.Tensor, num_frames: int, reduce: str) -> torch.Tensor:
    """`(num_frames,)` reduction ("mean", "amin", "amax") of a per-unit value over each frame's units."""
    return values.new_zeros(num_frames).scatter_reduce(0, frame_of_unit, values, reduce, include_self=False)


def build_scorer(config: STTSConfig, spec: VisionSpec) -> STTSScorer | None:
    """The scorer `config` asks for on a ViT of shape `spec`.

    Args:
        config (`STTSConfig`): the method, and the scorer's width, heads and input norm.
        spec (`VisionSpec`): the ViT's width, heads and MLP width (the scorer's defaults).

    Returns:
        `STTSScorer`, or `None` for the training-free methods.
    """
    if config.method != "scorer":
        return None
    num_heads = config.scorer_num_heads or spec.num_heads
    if spec.hidden_size % num_heads:
        raise STTSConfigError(
            f"STTSConfig.scorer_num_heads={num_heads} is invalid for this model: the scorer's attention pooling "
            f"splits the ViT width ({spec.hidden_size}) into heads, so it must be a divisor of {spec.hidden_size}."
        )
    return STTSScorer(
        input_size=spec.hidden_size,
        hidden_size=config.scorer_hidden_size or spec.mlp_size,
        num_heads=num_heads,
        input_norm=config.scorer_input_norm,
    )
