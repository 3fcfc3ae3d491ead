"""Speed of STTS against the unpruned model, measured in one process.

For every frame count and prune ratio: the inference forward (prefill) and a full training step (forward + backward,
every base parameter trainable, as in the paper's end-to-end recipe), baseline and STTS alternated, medians over
`--repeats` runs, speed-up as a ratio. Writes `speed.json` and `speed.md` into `--out`.

    python benchmarks/speed.py                       # 8, 16, 32 frames at 50%
    python benchmarks/speed.py --frames 8 16 --ratios 0.3 0.5 0.8 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import Qwen2_5_VLForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, small_qwen2_5_vl_config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--prune-layer", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (medians reported)")
    parser.add_argument("--size", type=int, default=224, help="frame height and width in pixels")
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args()


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def alternate(baseline: Callable[[], object], pruned: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately after one warm-up of each."""
    baseline(), pruned()
    base_times, stts_times = [], []
    for _ in range(repeats):
        base_times.append(timed(baseline))
        stts_times.append(timed(pruned))
    return statistics.median(base_times), statistics.median(stts_times)


def measure(frames: int, ratio: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    config = small_qwen2_5_vl_config()
    vlm = Qwen2_5_VLForConditionalGeneration(config)
    model = apply_stts(vlm, STTSConfig(prune_ratio=ratio, prune_layer=args.prune_layer, train_base_model=True))
    batch = build_qwen_batch(config, [Sample(video=moving_square_video(frames, args.size, args.size), answer=[5, 6])])

    def forward() -> None:
        with torch.no_grad():
            model(**batch)

    def train_step() -> None:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def without_stts(run: Callable[[], None]) -> Callable[[], None]:
        def run_base() -> None:
            with model.disable_stts():
                run()

        return run_base

    model.eval()
    report = model(**batch).stts
    forward_base, forward_stts = alternate(without_stts(forward), forward, args.repeats)
    model.train()
    train_base, train_stts = alternate(without_stts(train_step), train_step, args.repeats)
    return {
        "frames": frames,
        "prune_ratio": ratio,
        "video_tokens": report.units_before[0],
        "video_tokens_kept": report.units_after[0],
        "forward_s": {"baseline": forward_base, "stts": forward_stts, "speedup": forward_base / forward_stts},
        "train_step_s": {"baseline": train_base, "stts": train_stts, "speedup": train_base / train_stts},
    }


def markdown(results: list[dict], machine: str) -> str:
    lines = [
        f"Qwen2.5-VL-style model (ViT 12x256, LLM 8x512, random init), 224 px frames, prune_layer 3; {machine}.",
        "Medians, baseline and STTS alternated in one process.",
        "",
        "| frames | prune ratio | video tokens | forward baseline | forward STTS | speed-up | train step baseline "
        "| train step STTS | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, t = r["forward_s"], r["train_step_s"]
        lines.append(
            f"| {r['frames']} | {r['prune_ratio']:.0%} | {r['video_tokens']} -> {r['video_tokens_kept']} "
            f"| {f['baseline'] * 1000:.0f} ms | {f['stts'] * 1000:.0f} ms | {f['speedup']:.2f}x "
            f"| {t['baseline'] * 1000:.0f} ms | {t['stts'] * 1000:.0f} ms | {t['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    cases = [(frames, ratio) for frames in args.frames for ratio in args.ratios]
    results = [measure(frames, ratio, args) for frames, ratio in tqdm(cases, desc="benchmark cases")]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speed.json"), "w") as f:
        json.dump({"machine": machine, "results": results}, f, indent=2)
    table = markdown(results, machine)
    with open(os.path.join(args.out, "speed.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
