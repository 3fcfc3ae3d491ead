"""STTS quickstart: wrap a Qwen2.5-VL model, train the scorer on synthetic video, measure, save, reload.

    python examples/quickstart.py                         # a small random Qwen2.5-VL built from a config
    python examples/quickstart.py --model PATH_OR_REPO_ID # your Qwen2.5-VL checkpoint (already on disk / in cache)

Every video is a static textured background with one coloured square moving across it: most tokens are redundant,
and the scorer learns (through the temporal auxiliary loss) where things change. Only the scorer trains.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from tqdm.auto import tqdm
from transformers import Qwen2_5_VLForConditionalGeneration

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, small_qwen2_5_vl_config

COLORS = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.2), (0.2, 0.3, 1.0), (1.0, 0.9, 0.1)]
DIRECTIONS = [(0, 14), (14, 0), (0, -14), (-14, 0)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Qwen2.5-VL path or Hub id (default: a small random model from a config)")
    parser.add_argument("--steps", type=int, default=40, help="scorer training steps")
    parser.add_argument("--frames", type=int, default=16, help="frames per video (224x224)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--prune-layer", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3, help="scorer learning rate")
    parser.add_argument("--timing-runs", type=int, default=5, help="forward passes timed per variant")
    parser.add_argument("--output-dir", default="stts-quickstart", help="where the adapter is saved")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_base_model(args: argparse.Namespace) -> Qwen2_5_VLForConditionalGeneration:
    """The same base model every time it is called (a fixed seed for the random one)."""
    if args.model:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)
    return Qwen2_5_VLForConditionalGeneration(small_qwen2_5_vl_config())


def video_qa_batch(config, frames: int, rng: random.Random) -> dict[str, torch.Tensor]:
    """Two videos with a random square colour and motion; the answer token names the colour."""
    samples = []
    for _ in range(2):
        color = rng.randrange(len(COLORS))
        samples.append(
            Sample(
                video=moving_square_video(
                    frames,
                    224,
                    224,
                    square=42,
                    color=COLORS[color],
                    step=rng.choice(DIRECTIONS),
                    start=(rng.randrange(0, 140, 14), rng.randrange(0, 140, 14)),
                    seed=rng.randrange(1000),
                ),
                answer=[100 + color],
            )
        )
    return build_qwen_batch(config, samples, padding_side="left")


def median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    rng = random.Random(args.seed)
    vlm = load_base_model(args)
    config = STTSConfig(prune_ratio=args.prune_ratio, prune_layer=args.prune_layer)
    model = apply_stts(vlm, config)
    model.print_trainable_parameters()
    eval_batch = video_qa_batch(vlm.config, args.frames, random.Random(args.seed + 1))

    # 1. What gets pruned.
    model.eval()
    with torch.no_grad():
        report = model(**eval_batch).stts
    for i, (before, after) in enumerate(zip(report.units_before, report.units_after)):
        print(f"video {i}: {before} video tokens -> {after} after STTS ({before - after} pruned)")
    print(f"LLM sequence: {eval_batch['input_ids'].shape[1]} tokens -> {report.attention_mask.shape[1]}")

    # 2. Train the scorer (LM loss + 0.5 x temporal auxiliary loss).
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    aux_losses = []
    progress = tqdm(range(args.steps), desc="training the scorer")
    for _ in progress:
        out = model(**video_qa_batch(vlm.config, args.frames, rng))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        aux_losses.append(out.stts.aux_loss.item())
        progress.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{aux_losses[-1]:.4f}")
    window = max(1, min(5, len(aux_losses) // 2))
    first, last = statistics.mean(aux_losses[:window]), statistics.mean(aux_losses[-window:])
    print(f"temporal aux loss: {first:.4f} (first {window} steps) -> {last:.4f} (last {window} steps)")

    # 3. Forward-time speed-up, baseline and STTS alternated in one process, medians.
    model.eval()
    with torch.no_grad():
        model(**eval_batch)  # warm-up
        baseline, pruned = [], []
        for _ in tqdm(range(args.timing_runs), desc="timing forward passes"):
            with model.disable_stts():
                baseline.append(median_seconds(lambda: model(**eval_batch), 1))
            pruned.append(median_seconds(lambda: model(**eval_batch), 1))
    base_s, stts_s = statistics.median(baseline), statistics.median(pruned)
    print(f"forward: baseline {base_s * 1000:.0f} ms, STTS {stts_s * 1000:.0f} ms -> {base_s / stts_s:.2f}x faster")

    # 4. Save the adapter (only the scorer), reload it on a fresh base model, check it prunes the same tokens.
    model.save_pretrained(args.output_dir)
    reloaded = STTSModel.from_pretrained(load_base_model(args), args.output_dir)
    with torch.no_grad():
        original, again = model(**eval_batch), reloaded(**eval_batch)
    same_tokens = all(torch.equal(a, b) for a, b in zip(original.stts.keep_masks, again.stts.keep_masks))
    same_logits = torch.equal(original.logits, again.logits)
    print(
        f"saved to {args.output_dir}/; reloaded adapter prunes the same tokens: {same_tokens}, "
        f"same logits: {same_logits}"
    )
    if not (same_tokens and same_logits):
        raise SystemExit("The reloaded adapter does not reproduce the trained model.")


if __name__ == "__main__":
    main()
