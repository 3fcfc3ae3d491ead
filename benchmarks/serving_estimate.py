"""Prefill FLOPs at real models' shapes (random configs, no weights), 50% pruning. First table, Qwen2.5-VL-3B: STTS,
which prunes inside the ViT, against pruning after the ViT, as vLLM's EVS (and a learned-scorer plugin in its
place) can; used by docs/serving.md. Second table: the STTS scorer's share of the baseline's FLOPs and of the
pruned forward's at the spec's width (the ViT's MLP width) on Qwen2.5-VL-3B and LLaVA-OneVision-7B; quoted by the
README.

    python -m benchmarks.serving_estimate
"""

from __future__ import annotations

import torch

from benchmarks.speed.flops import FlopCount, llava_onevision_flops, qwen2_5_vl_flops
from stts_adapter.testing import qwen2_5_vl_3b_config
from stts_adapter.testing.llava_onevision import llava_onevision_7b_config

PRUNE_LAYER = 3
TEXT_TOKENS = 64
QWEN_UNITS = 12  # 336 x 336 frames: 12 x 12 units per temporal slot of 2 frames
LLAVA_UNITS = 14  # 384 x 384 frames: 27 x 27 patches pooled to 14 x 14 tokens


def half_kept(slots: int, side: int) -> torch.Tensor:
    """`(slots, side, side)` bool: half of the units kept at random, the first slot whole (seeded)."""
    keep = torch.ones(slots * side * side, dtype=torch.bool)
    first = side * side
    order = torch.randperm(keep.numel() - first, generator=torch.Generator().manual_seed(0))
    keep[order[: keep.numel() // 2] + first] = False
    return keep.view(slots, side, side)


def scorer_share(stts: FlopCount, of: FlopCount) -> float:
    """The scorer's FLOPs (with the gathering of its input) as a fraction of the forward `of` (the baseline's, or
    the pruned one's: `stts` itself)."""
    return stts.scoring() / of.forward()


def qwen_counts(frames: int) -> tuple[FlopCount, FlopCount, FlopCount]:
    """Qwen2.5-VL-3B on `frames` frames: (baseline, STTS at 50%, the same tokens pruned after the ViT)."""
    config = qwen2_5_vl_3b_config()
    keep = torch.ones(frames // 2, QWEN_UNITS, QWEN_UNITS, dtype=torch.bool)
    units = qwen_video_tokens(frames)  # == keep.numel()
    kept = units - units // 2
    scorer_hidden = config.vision_config.intermediate_size  # the spec's default width
    base = qwen2_5_vl_flops(config, keep, units + TEXT_TOKENS, PRUNE_LAYER)
    stts = qwen2_5_vl_flops(config, half_kept(*keep.shape[:2]), kept + TEXT_TOKENS, PRUNE_LAYER, scorer_hidden)
    after_vit = qwen2_5_vl_flops(config, keep, kept + TEXT_TOKENS, PRUNE_LAYER)
    return base, stts, after_vit


def llava_onevision_counts(frames: int) -> tuple[FlopCount, FlopCount]:
    """LLaVA-OneVision-7B on `frames` frames: (baseline, STTS at 50%); one newline token after the video."""
    config = llava_onevision_7b_config()
    keep = torch.ones(frames, LLAVA_UNITS, LLAVA_UNITS, dtype=torch.bool)
    units, kept = keep.numel(), keep.numel() - keep.numel() // 2
    scorer_hidden = config.vision_config.intermediate_size
    base = llava_onevision_flops(config, keep, units + 1 + TEXT_TOKENS, PRUNE_LAYER)
    stts = llava_onevision_flops(
        config, half_kept(frames, LLAVA_UNITS), kept + 1 + TEXT_TOKENS, PRUNE_LAYER, scorer_hidden
    )
    return base, stts


def qwen_video_tokens(frames: int) -> int:
    """Qwen2.5-VL-3B's video tokens for `frames` frames (one per unit of each temporal slot of 2 frames)."""
    return frames // 2 * QWEN_UNITS**2


def main() -> None:
    """Print both tables, a blank line between them."""
    qwen = {frames: qwen_counts(frames) for frames in (32, 128, 256)}
    print(
        "| frames | video tokens | STTS (pruned in the ViT) | pruned after the ViT | ViT share of the baseline "
        "| scorer share of the baseline |"
    )
    print("|---|---|---|---|---|---|")
    for frames, (base, stts, after_vit) in qwen.items():
        vit_share = 1 - (base.llm + base.llm_attention + base.lm_head) / base.forward()
        print(
            f"| {frames} | {qwen_video_tokens(frames)} | {base.forward() / stts.forward():.2f}x | "
            f"{base.forward() / after_vit.forward():.2f}x | {vit_share:.0%} | {scorer_share(stts, base):.2%} |"
        )
    print()
    print(
        "| model (real shapes) | frames | video tokens | STTS FLOP speed-up at 50% | scorer share of the baseline "
        "| scorer share of the pruned forward |"
    )
    print("|---|---|---|---|---|---|")
    for frames in (32, 128):
        base, stts, _ = qwen[frames]
        print(
            f"| Qwen2.5-VL-3B | {frames} | {qwen_video_tokens(frames)} | {base.forward() / stts.forward():.2f}x "
            f"| {scorer_share(stts, base):.2%} | {scorer_share(stts, stts):.2%} |"
        )
    for frames in (32, 128):
        base, stts = llava_onevision_counts(frames)
        print(
            f"| LLaVA-OneVision-7B | {frames} | {frames * LLAVA_UNITS**2} | {base.forward() / stts.forward():.2f}x "
            f"| {scorer_share(stts, base):.2%} | {scorer_share(stts, stts):.2%} |"
        )


if __name__ == "__main__":
    main()
