"""`stts-adapter convert-molmo2`: import the scorer of an official Molmo2 STTS checkpoint."""

from __future__ import annotations

import argparse


def run_convert_molmo2(args: argparse.Namespace) -> int:
    from ..convert import convert_molmo2_checkpoint

    config = convert_molmo2_checkpoint(
        args.checkpoint,
        args.out,
        prune_layer=args.prune_layer,
        prune_ratio=args.prune_ratio,
        num_heads=args.num_heads,
        num_vision_blocks=args.num_vision_blocks,
        base_model_name_or_path=args.base_model,
    )
    print(
        f"wrote {args.out}: a {config.vision_hidden_size}-wide scorer (MLP {config.scorer_hidden_size}) for a "
        f"{config.num_vision_blocks}-block Molmo2 ViT, reading block {config.prune_layer}"
    )
    return 0
