"""From a video file to generated text with STTS: decode, the model's own processor, prune, generate, draw.

    pip install "stts-adapter[video,cli]"
    python examples/video_file.py                                   # writes a small mp4 and uses a tiny random model
    python examples/video_file.py --video clip.mp4 --model Qwen/Qwen2.5-VL-3B-Instruct --adapter you/qwen-stts

Without --model the model is a tiny random Qwen2.5-VL built from a config, with its REAL processor class and a tiny
tokenizer built offline (`stts_adapter.testing.qwen.tiny_qwen_vl_processor`): the tokens it generates mean nothing,
but every step is the one a real checkpoint takes.
"""

from __future__ import annotations

import argparse
import os

import torch

from stts_adapter import AutoSTTSModel, STTSConfig, apply_stts, prepare_inputs
from stts_adapter.tts import frames_for_budget
from stts_adapter.visualization import kept_pixels, render_kept_units


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video", help="a video file (default: a small mp4 written by this script)")
    parser.add_argument("--model", help="a Qwen2.5-VL path or Hub id (default: a tiny random model)")
    parser.add_argument("--adapter", help="an STTS adapter for --model (default: a fresh scorer)")
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument("--out", default="video_file_kept.png", help="the picture of the kept units")
    return parser.parse_args()


def tiny_model_and_processor():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from stts_adapter.testing import tiny_qwen2_5_vl_config
    from stts_adapter.testing.qwen import tiny_qwen_vl_processor

    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config()
    return Qwen2_5_VLForConditionalGeneration(config).eval(), tiny_qwen_vl_processor(config)


def write_example_video(path: str) -> str:
    from stts_adapter.processing import write_video_file
    from stts_adapter.testing import moving_square_video

    frames = moving_square_video(8, 112, 168, square=28, step=(0, 14), start=(42, 0))
    write_video_file(path, (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), fps=4)
    return path


def main() -> None:
    args = parse_args()
    video = args.video or write_example_video("example_clip.mp4")
    if args.model:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        processor = AutoProcessor.from_pretrained(args.model)
        if args.adapter:
            model = AutoSTTSModel.from_pretrained(args.adapter)
        else:
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model).eval()
            model = apply_stts(base, STTSConfig(prune_ratio=args.prune_ratio))
    else:
        base, processor = tiny_model_and_processor()
        model = apply_stts(base, STTSConfig(prune_ratio=args.prune_ratio, prune_layer=1))
    model.set_prune_ratio(args.prune_ratio)

    prompt = "<|vision_start|><|video_pad|><|vision_end|> What happens in the video?"
    inputs = prepare_inputs(processor, model, text=[prompt], videos=[video], return_tensors="pt")
    with torch.no_grad():
        report = model(**inputs).stts
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    print(f"{os.path.basename(video)}: {report.units_before[0]} video tokens -> {report.units_after[0]} kept")
    # Test-time scaling: the frames STTS can take for the video tokens the unpruned model spends on this clip.
    slots = int(inputs["video_grid_thw"][0, 0])
    plan = frames_for_budget(
        report.units_before[0], report.units_before[0] // slots, args.prune_ratio or 0.5, frames_per_slot=2
    )
    print(f"the same {report.units_before[0]} tokens buy {plan.frames} frames at {plan.prune_ratio:.0%} pruning")
    print("generated ids:", new_tokens[0].tolist())  # a tiny random model's tokens mean nothing
    print("generated text:", repr(processor.batch_decode(new_tokens, skip_special_tokens=True)[0]))

    # The kept units over the decoded frames (Qwen: a temporal slot of 2 frames, 2x2 patches of 14 px per unit).
    from stts_adapter.processing import decode_video_files

    frames, _ = decode_video_files(video)
    frames = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    keep = report.keep_masks[0]
    grid_thw = inputs["video_grid_thw"][0].tolist()
    grid = (grid_thw[1] // 2, grid_thw[2] // 2)
    frames = torch.nn.functional.interpolate(frames, size=(grid[0] * 28, grid[1] * 28), mode="bilinear")
    pixels = kept_pixels(keep, grid, *frames.shape[:1], *frames.shape[-2:])
    captions = [
        f"frame {t}: {int(keep[t * keep.shape[0] // len(frames)].sum())}/{keep.shape[1]}" for t in range(len(frames))
    ]
    render_kept_units(frames, pixels, captions)[0].save(args.out)
    print(f"kept units drawn in {args.out}")


if __name__ == "__main__":
    main()
