"""LoRA + STTS with `transformers.Trainer`, on a small synthetic video-QA set this script builds itself.

    python examples/train_with_trainer.py                       # a small random Qwen2.5-VL: ~2 min on 2 CPU cores
    python examples/train_with_trainer.py --size tiny           # a tiny one: seconds
    torchrun --nproc_per_node 2 examples/train_with_trainer.py  # DDP, unchanged (gloo on CPU, NCCL on GPUs)
    accelerate launch --multi_gpu --num_processes 2 examples/train_with_trainer.py  # DDP too (gloo without GPUs)
    python examples/train_with_trainer.py --model PATH          # your Qwen2.5-VL checkpoint (on disk or in cache)
    python examples/train_with_trainer.py --aux-loss bce_upper --scorer-first-steps 15  # two phases (README's
                                                                # recipe when content changes without mattering)

Every video is a static textured background with one coloured square moving across it; the question asks for the
square's colour or for the direction it moves in; the answer is one token (and EOS). The recipe:

1. LoRA first: `get_peft_model(vlm, LoraConfig(target_modules="all-linear"))`, then `apply_stts` on the PeftModel.
   LoRA and the scorer both train; nothing else does.
2. `stts_parameter_groups` gives the scorer its own learning rate; `STTSCallback` adds the auxiliary loss, the kept
   fraction and score statistics to the Trainer's logs.
3. Each adapter is saved to its own folder, by the main process only: the PeftModel's `save_pretrained` writes the
   LoRA weights (never the scorer), the STTSModel's writes the scorer (never LoRA). Both load back on a fresh base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local: never wait for the network

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Qwen2_5_VLForConditionalGeneration, Trainer, TrainingArguments

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.sequence import pad_token_id
from stts_adapter.testing import (
    BOS,
    EOS,
    Sample,
    build_qwen_batch,
    moving_square_video,
    pad_rows,
    small_qwen2_5_vl_config,
    tiny_qwen2_5_vl_config,
)
from stts_adapter.training import STTSCallback, stts_parameter_groups

COLORS = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.2), (0.2, 0.3, 1.0), (1.0, 0.9, 0.1)]
DIRECTIONS = [(0, 1), (1, 0), (0, -1), (-1, 0)]  # right, down, left, up (in squares of 1/8 of the frame per frame)
COLOR_QUESTION, DIRECTION_QUESTION = [21, 22, 23], [21, 24, 23]
COLOR_ANSWERS, DIRECTION_ANSWERS = 100, 110  # answer token = base + index
TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}  # None: the pad id
SIZES = {  # ViT / LLM of the random models; frames and frame side of the videos; prune layer
    "tiny": dict(config=tiny_qwen2_5_vl_config, frames=4, side=56, prune_layer=1),
    "small": dict(config=small_qwen2_5_vl_config, frames=8, side=112, prune_layer=3),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Qwen2.5-VL path or Hub id (default: a random model from a config)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="size of the random model and videos")
    parser.add_argument("--output-dir", default="stts-trainer", help="Trainer output; adapters go to lora/ and stts/")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--train-samples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    parser.add_argument("--scorer-lr", type=float, default=3e-4, help="the scorer's learning rate")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    parser.add_argument(
        "--aux-loss",
        choices=("bce", "mse", "bce_upper"),
        default="bce",
        help="STTSConfig.aux_loss; bce_upper for scenes whose content changes without mattering (README)",
    )
    parser.add_argument(
        "--llm-key-bias-weight",
        type=float,
        default=0.0,
        help="STTSConfig.llm_key_bias_weight: an LM path that compares the kept units across frames (README)",
    )
    parser.add_argument(
        "--scorer-first-steps",
        type=int,
        default=0,
        help="two phases: the scorer alone for this many steps, then LoRA alone (STTSCallback(scorer_first_steps))",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary-json", help="each process writes a summary to this path ({rank} is replaced)")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------ data
class VideoQADataset(torch.utils.data.Dataset):
    """Moving-square videos with a colour or direction question, as per-sample processor outputs.

    Each item holds the keyword arguments of the model for one sample (`input_ids`, `labels`, ...,
    `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`), like a processor's output: the Trainer keeps
    these columns because the STTS model's `forward` takes the base model's arguments.
    """

    def __init__(self, config, size: int, frames: int, side: int, seed: int) -> None:
        self.config, self.frames, self.side = config, frames, side
        rng = random.Random(seed)
        self.items = [
            (rng.randrange(4), rng.randrange(4), rng.random() < 0.5, rng.randrange(10_000)) for _ in range(size)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int) -> Sample:
        color, direction, ask_color, seed = self.items[index]
        step = self.side // 8
        video = moving_square_video(
            self.frames,
            self.side,
            self.side,
            square=self.side // 4,
            color=COLORS[color],
            step=(DIRECTIONS[direction][0] * step, DIRECTIONS[direction][1] * step),
            start=(3 * self.side // 8, 3 * self.side // 8),
            seed=seed,
        )
        question = COLOR_QUESTION if ask_color else DIRECTION_QUESTION
        answer = COLOR_ANSWERS + color if ask_color else DIRECTION_ANSWERS + direction
        return Sample(video=video, prefix=[BOS, 11, 12], suffix=question, answer=[answer, EOS])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = build_qwen_batch(self.config, [self.sample(index)])
        return {k: v[0] if k in TOKEN_KEYS else v for k, v in batch.items()}


class VideoQACollator:
    """Left-pads the per-token columns and concatenates the video columns along their first dimension (videos and
    their patches), as the Qwen2.5-VL processor lays out a batch."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            if key in TOKEN_KEYS:
                pad = self.pad_token_id if TOKEN_KEYS[key] is None else TOKEN_KEYS[key]
                batch[key] = pad_rows([f[key].tolist() for f in features], pad, "left")
            else:
                batch[key] = torch.cat([f[key] for f in features])
        return batch


# ------------------------------------------------------------------------------------------------ model
def load_base_model(args: argparse.Namespace) -> Qwen2_5_VLForConditionalGeneration:
    """The same base model every time (and on every process): a checkpoint, or a random model with a fixed seed."""
    if args.model:
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)
    return Qwen2_5_VLForConditionalGeneration(SIZES[args.size]["config"]())


def build_model(args: argparse.Namespace) -> STTSModel:
    """LoRA first, STTS on top: the supported order (PEFT freezes everything but LoRA; the scorer is added after)."""
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(load_base_model(args), lora)
    torch.manual_seed(args.seed + 1)  # the scorer's initialisation
    stts = STTSConfig(
        prune_ratio=args.prune_ratio,
        prune_layer=SIZES[args.size]["prune_layer"],
        aux_loss=args.aux_loss,
        llm_key_bias_weight=args.llm_key_bias_weight,
    )
    return apply_stts(peft_model, stts)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    args = parse_args()
    model = build_model(args)
    config = model.transformers_model.config
    size = SIZES[args.size]
    train_set = VideoQADataset(config, args.train_samples, size["frames"], size["side"], seed=args.seed)
    eval_set = VideoQADataset(config, 8, size["frames"], size["side"], seed=args.seed + 1000)
    collator = VideoQACollator(pad_token_id(config))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        logging_steps=args.logging_steps,
        eval_strategy="steps",
        eval_steps=args.max_steps,
        label_names=["labels"],  # the STTS model (like a PeftModel) hides the label argument from the Trainer
        train_sampling_strategy="sequential",  # the set is in random order already: N processes x batch B see the
        # same batches as 1 process x batch N*B
        # Every batch has videos, so the scorer and every LoRA layer get gradients (in two phases, the frozen half none)
        ddp_find_unused_parameters=args.scorer_first_steps > 0,
        save_strategy="no",  # adapters are saved below; Trainer checkpoints would hold the whole model
        activation_checkpointing=args.gradient_checkpointing,  # of the base model's layers; STTS works with it
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=args.lr, scorer_lr=args.scorer_lr))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        optimizers=(optimizer, None),  # the Trainer builds the scheduler; it scales both groups alike
        callbacks=[STTSCallback(save_adapters=False, scorer_first_steps=args.scorer_first_steps)],
    )
    if trainer.is_world_process_zero():
        model.print_trainable_parameters()
    trainer.train()

    # Each adapter in its own folder, written by the main process only.
    main_process = trainer.is_world_process_zero()
    lora_dir, stts_dir = os.path.join(args.output_dir, "lora"), os.path.join(args.output_dir, "stts")
    model.base_model.save_pretrained(lora_dir, is_main_process=main_process)  # the PeftModel: LoRA weights only
    model.save_pretrained(stts_dir, is_main_process=main_process)  # the STTSModel: scorer weights only

    rank = trainer.args.process_index
    scorer = {k: v for k, v in model.scorer.state_dict().items()}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    last_log = next((h for h in reversed(trainer.state.log_history) if "stts_kept_fraction" in h), {})
    summary = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "main_process": main_process,
        "global_step": trainer.state.global_step,
        "scorer_checksum": checksum(scorer),
        "lora_checksum": checksum(lora),
        "last_log": last_log,
    }
    print(
        f"[rank {rank}/{trainer.args.world_size}] scorer {summary['scorer_checksum']} lora {summary['lora_checksum']}"
    )
    if main_process:
        summary["reload_matches"] = reload_matches(args, model, eval_set, collator, lora_dir, stts_dir)
        print(
            f"saved LoRA to {lora_dir}/ and STTS to {stts_dir}/; reloaded on a fresh base model, same logits and "
            f"kept tokens: {summary['reload_matches']}"
        )
    if args.summary_json:
        with open(args.summary_json.format(rank=rank), "w") as f:
            json.dump(summary, f, indent=1)
    if torch.distributed.is_initialized():  # launched by torchrun / accelerate: leave together, tidily
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if main_process and not summary["reload_matches"]:
        raise SystemExit("The reloaded adapters do not reproduce the trained model.")


@torch.no_grad()
def reload_matches(args, model: STTSModel, eval_set, collator, lora_dir: str, stts_dir: str) -> bool:
    """Load both adapters on a fresh base model (LoRA first, then STTS) and compare with the trained model."""
    reloaded = STTSModel.from_pretrained(PeftModel.from_pretrained(load_base_model(args), lora_dir), stts_dir)
    batch = collator([eval_set[i] for i in range(min(4, len(eval_set)))])
    model.eval()
    original, again = model(**batch), reloaded(**batch)
    same_kept = all(torch.equal(a, b) for a, b in zip(original.stts.keep_masks, again.stts.keep_masks))
    return same_kept and torch.allclose(original.logits, again.logits, atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
    main()
