"""Prefill FLOPs of Qwen2.5-VL-3B's shapes (random config, no weights) at 50% pruning: STTS, which prunes inside the
ViT, against pruning after the ViT, as vLLM's EVS (and a learned-scorer plugin in its place) can. Used by
docs/serving.md.

    python -m benchmarks.serving_estimate
"""

from __future__ import annotations

import torch

from benchmarks.speed.flops import qwen2_5_vl_flops
from stts_adapter.testing import qwen2_5_vl_3b_config


def main() -> None:
    """Print the table: speed-ups of both at 32, 128 and 256 frames, the ViT's share of the baseline's FLOPs and the
    STTS scorer's (at the spec's width, the ViT's MLP width)."""
    config = qwen2_5_vl_3b_config()
    rows = cols = 12  # 336 x 336 frames: 12 x 12 units per temporal slot of 2 frames
    text_tokens = 64
    scorer_hidden = config.vision_config.intermediate_size  # the spec's default width
    print(
        "| frames | video tokens | STTS (pruned in the ViT) | pruned after the ViT | ViT share of the baseline "
        "| scorer share of the baseline |"
    )
    print("|---|---|---|---|---|---|")
    for frames in (32, 128, 256):
        keep = torch.ones(frames // 2, rows, cols, dtype=torch.bool)
        units, pruned = keep.numel(), keep.numel() // 2
        torch.manual_seed(0)
        half = keep.flatten().clone()
        half[torch.randperm(units - rows * cols)[:pruned] + rows * cols] = False  # the first slot is kept
        half = half.view_as(keep)
        base = qwen2_5_vl_flops(config, keep, units + text_tokens, prune_layer=3)
        stts = qwen2_5_vl_flops(config, half, units - pruned + text_tokens, prune_layer=3, scorer_hidden=scorer_hidden)
        after_vit = qwen2_5_vl_flops(config, keep, units - pruned + text_tokens, prune_layer=3)
        vit_share = 1 - (base.llm + base.llm_attention + base.lm_head) / base.forward()
        scorer_share = (stts.scorer + stts.scorer_input) / base.forward()
        print(
            f"| {frames} | {units} | {base.forward() / stts.forward():.2f}x | "
            f"{base.forward() / after_vit.forward():.2f}x | {vit_share:.0%} | {scorer_share:.2%} |"
        )


if __name__ == "__main__":
    main()
