"""Accuracy of STTS on a synthetic video-QA task: the paper's table in miniature.

Every video is a static textured scene with sensor noise, 16 frames of 84x84 px (8 temporal slots x 3x3 units); the
answer lives in the few units that change after the first slot: the colour of a square that appears, the direction a
square moves in, how many squares flash, which corner a square appears in (4 answers each: chance is 25%). A small
Qwen2.5-VL (random init) is first trained unpruned (the shared init, as the paper starts from a trained video VLM);
then every row is fine-tuned end to end from that init with the same steps and data per seed, and evaluated on a
held-out test set:

- baseline (no pruning); STTS, random and similarity pruning at 50% and 80%; uniform frame subsampling at (about)
  the same token budget;
- scorer quality: recall of the ground-truth changing units among the kept ones;
- test-time scaling: long videos (32 frames) whose flashes last one frame; STTS given all 32 frames at 50% (the
  baseline's token count) against the baseline on every 2nd frame.

Outputs in `--out`: video_qa.json (every run), video_qa.md (the table), video_qa.png (accuracy and recall vs the
fraction of tokens removed) and kept_units.png (kept units of the trained STTS-50% model on two test videos).

    python benchmarks/video_qa.py                          # the full table (3 seeds), all cores
    python benchmarks/video_qa.py --quick --out /tmp/vqa   # baseline and STTS-50%, 1 seed, short: a smoke test
    python benchmarks/video_qa.py --eval-split val --rows baseline stts-50 --seeds 0   # tune on validation only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.cli import kept_pixels, render_kept_units
from stts_adapter.testing import (
    BOS,
    Sample,
    build_qwen_batch,
    special_tokens,
    tiny_qwen2_5_vl_config,
    tiny_text_config,
)
from stts_adapter.training import stts_parameter_groups

# ----------------------------------------------------------------------------------------------- the task
QUESTION_TYPES = ("colour", "direction", "count", "corner")
ANSWERS = {
    "colour": ("red", "green", "blue", "yellow"),
    "direction": ("right", "left", "down", "up"),
    "count": ("1", "2", "3", "4"),
    "corner": ("top-left", "top-right", "bottom-left", "bottom-right"),
}
PALETTE = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0))
MOVES = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (rows, columns) per step: right, left, down, up
PREFIX = [BOS, 11, 12]
QUESTION_TOKEN = 30  # + question type index, between two fixed tokens
ANSWER_TOKEN = 100  # + 10 x question type + answer index
CELL = 28  # pixels of one unit side (14 px patches, 2x2 merge): every object sits inside one unit
OBJECT = 28  # side of a drawn object, centred in its cell
SLOT = 2  # frames per temporal slot (Qwen's temporal patch)
# The processor's normalisation (OpenAI CLIP mean and std, as Qwen2.5-VL's image processor uses).
PIXEL_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
PIXEL_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def question_tokens(question: int) -> list[int]:
    return [21, QUESTION_TOKEN + question, 23]


def answer_token(question: int, answer: int) -> int:
    return ANSWER_TOKEN + 10 * question + answer


def candidate_tokens(question: int) -> list[int]:
    return [answer_token(question, a) for a in range(len(ANSWERS[QUESTION_TYPES[question]]))]


@dataclass(frozen=True)
class VideoSettings:
    """How videos are made.

    Every event starts at some step after the first temporal slot (which STTS always keeps whole, so it never holds
    the answer): a square appears, moves or goes dark there and stays so to the end (a change of state), or a light
    flashes for `flash` steps. Everything else is a static scene.

    Args:
        frames (`int`): frames per video (even: Qwen puts 2 frames in one temporal slot).
        side (`int`): frame height and width in pixels (3 x CELL: a 3x3 grid of units with a centre and 4 corners).
        tick (`int`): frames per event step: 2 (the standard set: events happen on temporal-slot boundaries) or 1
            (the long set: events happen on any frame).
        flash (`int`): steps a flash lasts.
        noise (`float`): std of the per-frame sensor noise added to every pixel.
    """

    frames: int = 16
    side: int = 84
    tick: int = 2
    flash: int = 2
    noise: float = 0.02

    @property
    def steps(self) -> int:
        return self.frames // self.tick

    @property
    def first_step(self) -> int:
        """The first step after the first temporal slot (which STTS always keeps whole: no answer there)."""
        return SLOT // self.tick

    @property
    def cells(self) -> int:
        return self.side // CELL


@dataclass
class Clip:
    """One question about one video.

    Attributes:
        video (`torch.Tensor` of shape `(frames, 3, side, side)`): pixels in [0, 1], noise included.
        question, answer (`int`): question type index and answer index (among 4).
        changed (`torch.Tensor` of shape `(slots, units_per_slot)`, bool): units whose clean pixels differ from the
            same unit in the previous temporal slot (the ground truth of what changes; slot 0 is all False).
    """

    video: torch.Tensor
    question: int
    answer: int
    changed: torch.Tensor


def textured_background(settings: VideoSettings, generator: torch.Generator) -> torch.Tensor:
    """A static scene: 14 px cells of random muted colours, as `moving_square_video` draws its background."""
    cells = settings.side // 14
    texture = torch.rand(3, cells, cells, generator=generator) * 0.5 + 0.25
    return texture.repeat_interleave(14, 1).repeat_interleave(14, 2)


def draw(video: torch.Tensor, step_frames: range, cell: tuple[int, int], color: tuple[float, float, float]) -> None:
    """Paint an OBJECT-sized square centred in `cell` on the frames of `step_frames`, in place."""
    margin = (CELL - OBJECT) // 2
    top, left = cell[0] * CELL + margin, cell[1] * CELL + margin
    video[step_frames.start : step_frames.stop, :, top : top + OBJECT, left : left + OBJECT] = torch.tensor(color)[
        :, None, None
    ]


def frames_of(settings: VideoSettings, start: int, stop: int | None = None) -> range:
    """Frames of event steps `start` (inclusive) to `stop` (exclusive; default: the end of the video)."""
    return range(start * settings.tick, (settings.steps if stop is None else stop) * settings.tick)


def start_step(rng: random.Random, settings: VideoSettings, room: int = 1) -> int:
    """A random step after the first temporal slot that leaves `room` steps before the end."""
    return rng.randrange(settings.first_step, settings.steps - room + 1)


def random_colour(rng: random.Random) -> tuple[float, float, float]:
    """A palette colour: every question's objects share the palette, so what the model learns for one question (find
    the square that appears) serves the others (a first design drew the moving square and the flashes white or
    cyan; the tiny model then learned the colour and corner questions and never the other two)."""
    return PALETTE[rng.randrange(len(PALETTE))]


def add_colour_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """A square of one of the palette colours appears in a random cell and stays."""
    colour = rng.randrange(len(PALETTE))
    cell = (rng.randrange(settings.cells), rng.randrange(settings.cells))
    draw(video, frames_of(settings, start_step(rng, settings)), cell, PALETTE[colour])
    return colour


def add_direction_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """A square appears in the centre cell, one step later moves one cell right, left, down or up, and stays."""
    direction = rng.randrange(len(MOVES))
    centre, colour = settings.cells // 2, random_colour(rng)
    start = start_step(rng, settings, room=2)
    draw(video, frames_of(settings, start, start + 1), (centre, centre), colour)
    draw(video, frames_of(settings, start + 1), (centre + MOVES[direction][0], centre + MOVES[direction][1]), colour)
    return direction


def add_count_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """1 to 4 flashes (a square lit for `settings.flash` steps at a random time), each in its own cell."""
    count = rng.randrange(4)
    cells = rng.sample([(r, c) for r in range(settings.cells) for c in range(settings.cells)], count + 1)
    for cell in cells:
        start = start_step(rng, settings, room=settings.flash)
        draw(video, frames_of(settings, start, start + settings.flash), cell, random_colour(rng))
    return count


def add_corner_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """A square appears in one corner of the frame and stays."""
    corner = rng.randrange(4)
    last = settings.cells - 1
    cell = ((corner // 2) * last, (corner % 2) * last)
    draw(video, frames_of(settings, start_step(rng, settings)), cell, random_colour(rng))
    return corner


EVENTS = (add_colour_event, add_direction_event, add_count_event, add_corner_event)


def changed_units(clean: torch.Tensor) -> torch.Tensor:
    """`(slots, units)` bool: units whose pixels differ from the same unit one temporal slot earlier."""
    frames, _, height, width = clean.shape
    slots = clean.reshape(frames // SLOT, SLOT, 3, height // CELL, CELL, width // CELL, CELL)
    difference = (slots[1:] - slots[:-1]).abs().amax(dim=(1, 2, 4, 6))  # (slots - 1, rows, columns)
    changed = torch.cat([torch.zeros_like(difference[:1]), difference]) > 1e-6
    return changed.flatten(1)


def make_clip(name: str, settings: VideoSettings, question: int | None = None) -> Clip:
    """The clip called `name` (deterministic: the same name always gives the same clip)."""
    rng = random.Random(name)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    question = rng.randrange(len(QUESTION_TYPES)) if question is None else question
    clean = textured_background(settings, generator).expand(settings.frames, -1, -1, -1).clone()
    answer = EVENTS[question](clean, rng, settings)
    noise = torch.randn(clean.shape, generator=generator) * settings.noise
    return Clip((clean + noise).clamp(0, 1), question, answer, changed_units(clean))


def clip_stream(split: str, seed: int, settings: VideoSettings) -> Iterator[Clip]:
    """Endless training clips of one seed: the same sequence for every row trained with that seed."""
    index = 0
    while True:
        yield make_clip(f"{split}/{settings}/{seed}/{index}", settings)
        index += 1


def clip_set(split: str, size: int, settings: VideoSettings) -> list[Clip]:
    """A fixed evaluation set, balanced over question types (separate names from every training stream)."""
    return [make_clip(f"{split}/{settings}/{i}", settings, i % len(QUESTION_TYPES)) for i in range(size)]


# ----------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One line of the table.

    Args:
        name (`str`): its label.
        method (`str`): "none" (unpruned), "scorer", "random", "similarity" (STTS methods) or "subsample" (uniform
            temporal-slot subsampling).
        ratio (`float`): fraction of video tokens removed (the prune ratio, or the subsampling's target).
        variant (`str`): "standard" or "long" (the test-time-scaling set).
        frame_stride (`int`): keep every n-th frame of the video before anything else (the long set's baseline
            samples half the frames, as a fixed frame budget does).
    """

    name: str
    method: str
    ratio: float = 0.0
    variant: str = "standard"
    frame_stride: int = 1

    @property
    def prunes(self) -> bool:
        return self.method in ("scorer", "random", "similarity")

    @property
    def slot_stride(self) -> int:
        """Subsampling keeps 1 temporal slot in this many: 1 / (1 - ratio), rounded (50% -> 2, 80% -> 5)."""
        return round(1 / (1 - self.ratio)) if self.method == "subsample" else 1


ROWS = {
    row.name: row
    for row in (
        Row("baseline", "none"),
        Row("stts-50", "scorer", 0.5),
        Row("stts-80", "scorer", 0.8),
        Row("random-50", "random", 0.5),
        Row("random-80", "random", 0.8),
        Row("similarity-50", "similarity", 0.5),
        Row("similarity-80", "similarity", 0.8),
        Row("subsample-50", "subsample", 0.5),
        Row("subsample-80", "subsample", 0.8),
        Row("long-baseline", "none", variant="long", frame_stride=2),
        Row("long-stts-50-2x", "scorer", 0.5, variant="long"),
    )
}
QUICK_ROWS = ("baseline", "stts-50")
LONG_VIDEO = VideoSettings(frames=32, tick=1, flash=1)


def view(video: torch.Tensor, row: Row) -> tuple[torch.Tensor, float]:
    """The frames `row` gives the model and the seconds one temporal slot of them spans (for M-RoPE time).

    One temporal slot of the full video spans 1 s.
    """
    video = video[:: row.frame_stride]
    slots = video.reshape(-1, SLOT, *video.shape[1:])[:: row.slot_stride]
    return slots.flatten(0, 1), float(row.frame_stride * row.slot_stride)


def kept_slots(slots: int, row: Row) -> torch.Tensor:
    """`(slots,)` bool: the temporal slots of the full video that subsampling keeps."""
    keep = torch.zeros(slots, dtype=torch.bool)
    keep[:: row.slot_stride] = True
    return keep


def build_batch(config, clips: Sequence[Clip], row: Row) -> dict[str, torch.Tensor]:
    """The processor-faithful batch of `clips` as `row` sees them (left padding, labels on the answer only)."""
    samples, seconds = [], 1.0
    for clip in clips:
        frames, seconds = view(clip.video, row)
        samples.append(
            Sample(
                video=(frames - PIXEL_MEAN) / PIXEL_STD,
                prefix=PREFIX,
                suffix=question_tokens(clip.question),
                answer=[answer_token(clip.question, clip.answer)],
            )
        )
    batch = build_qwen_batch(config, samples, padding_side="left")
    batch["second_per_grid_ts"] = torch.full((len(clips),), seconds)
    return batch


# ----------------------------------------------------------------------------------------------- model
@dataclass(frozen=True)
class TrainSettings:
    """Training and evaluation settings (the same for every row).

    Args:
        pretrain_steps (`int`): steps of the shared init: the unpruned model trained on the standard set (the
            paper fine-tunes a trained video VLM, Molmo2-4B; this is its miniature).
        steps (`int`): fine-tuning steps of every row, from that init (the whole model, plus the scorer).
        batch_size (`int`): clips per step.
        pretrain_lr, lr (`float`): peak learning rates (linear warm-up, cosine decay to 0).
        scorer_lr (`float`): peak learning rate of the STTS scorer in fine-tuning.
        warmup (`int`): warm-up steps of each phase.
        weight_decay (`float`): AdamW weight decay.
        prune_layer (`int`): ViT block scored by STTS (block prune_layer + 2 on runs on kept patches only).
        eval_size (`int`): evaluation clips per set (balanced over question types).
        eval_batch_size (`int`): clips per evaluation forward.
    """

    pretrain_steps: int = 1000
    steps: int = 100
    batch_size: int = 16
    pretrain_lr: float = 1e-3
    lr: float = 5e-4
    scorer_lr: float = 1e-2
    warmup: int = 20
    weight_decay: float = 0.0
    prune_layer: int = 1
    eval_size: int = 256
    eval_batch_size: int = 32


QUICK = dict(pretrain_steps=240, steps=40, batch_size=8, eval_size=96)
TEXT_WIDTH, TEXT_LAYERS = 128, 3


def model_config() -> Qwen2_5_VLConfig:
    """The test suite's tiny Qwen2.5-VL ViT (5 blocks x 64, one attention window per frame) and a 3 x 128 LLM.

    The LLM's M-RoPE uses rope_theta 4 with sections (t, h, w) = (4, 6, 6): with the default theta 10^4 a 32-wide
    head gives the h and w sections only its slowest frequencies, which barely tell the 3 rows or columns of a frame
    apart (in our runs a model with them stayed at chance on the corner question).
    """
    vision = tiny_qwen2_5_vl_config(window_size=VideoSettings().side, out_hidden_size=TEXT_WIDTH).vision_config
    text = tiny_text_config(TEXT_WIDTH, TEXT_LAYERS, 2 * TEXT_WIDTH)
    text["rope_parameters"].update(rope_theta=4.0, mrope_section=[4, 6, 6])
    return Qwen2_5_VLConfig(vision_config=vision.to_dict(), text_config=text, **special_tokens())


def schedule(step: int, steps: int, warmup: int) -> float:
    """Fraction of the peak learning rate at `step`: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def optimizer_for(model: torch.nn.Module, peak_lr: float, train: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter; a freshly initialised STTS scorer gets its own, higher learning rate
    (the rest of the model starts trained, the scorer does not)."""
    if getattr(model, "scorer", None) is not None:
        groups = stts_parameter_groups(model, scorer_lr=train.scorer_lr, lr=peak_lr, weight_decay=train.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": peak_lr}]
    return torch.optim.AdamW(groups, lr=peak_lr, weight_decay=train.weight_decay)


def train_steps(
    model: torch.nn.Module,
    row: Row,
    stream: Iterator[Clip],
    steps: int,
    peak_lr: float,
    train: TrainSettings,
    progress: tqdm,
    label: str,
) -> tuple[list[float], list[float]]:
    """Train every trainable parameter with the model's own loss (LM loss on the answer, + STTS's aux loss).

    Returns:
        The loss of every step, and STTS's temporal aux loss of every step (empty without a scorer).
    """
    optimizer = optimizer_for(model, peak_lr, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, steps, train.warmup))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    losses: list[float] = []
    aux_losses: list[float] = []
    for step in range(steps):
        batch = build_batch(model.config, [next(stream) for _ in range(train.batch_size)], row)
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        report = getattr(out, "stts", None)
        if report is not None and report.aux_loss is not None:
            aux_losses.append(report.aux_loss.item())
        progress.update()
        if step % 10 == 0:
            progress.set_postfix_str(f"{label} loss {statistics.mean(losses[-10:]):.3f}")
    return losses, aux_losses


def pretrain(video: VideoSettings, train: TrainSettings, progress: tqdm) -> dict[str, torch.Tensor]:
    """The shared init: a random model trained unpruned on the standard set. Returns its state dict."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(model_config())
    stream = clip_stream("pretrain", 0, video)
    train_steps(model, ROWS["baseline"], stream, train.pretrain_steps, train.pretrain_lr, train, progress, "init")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_model(row: Row, seed: int, init: dict[str, torch.Tensor], train: TrainSettings) -> torch.nn.Module:
    """The init, wrapped with STTS for the pruning rows (every parameter trainable; the scorer seeded by `seed`)."""
    model = Qwen2_5_VLForConditionalGeneration(model_config())
    model.load_state_dict(init)
    if not row.prunes:
        return model
    torch.manual_seed(10_000 + seed)
    config = STTSConfig(
        prune_ratio=row.ratio, prune_layer=train.prune_layer, method=row.method, train_base_model=True, seed=seed
    )
    return apply_stts(model, config)


@dataclass
class Predictions:
    """What a model answered on a chunk of clips, and what it saw."""

    answers: list[int]
    video_tokens: list[int]  # video tokens the LLM saw, per clip
    keep_masks: list[torch.Tensor | None]  # per clip, `(slots, units)` kept units in the full video's layout


@torch.no_grad()
def predict(model: torch.nn.Module, clips: Sequence[Clip], row: Row) -> Predictions:
    """Argmax over each question's candidate answers at the answer position (one forward, no generation)."""
    batch = build_batch(model.config, clips, row)
    out = model(**batch)
    report = getattr(out, "stts", None)
    labels = batch["labels"] if report is None else report.prune_like(batch["labels"], -100)
    rows, positions = torch.nonzero(labels != -100, as_tuple=True)  # one answer token per clip
    logits = out.logits[rows, positions - 1]  # the logits that predict the answer token
    candidates = torch.tensor([candidate_tokens(c.question) for c in clips])
    answers = logits.gather(1, candidates).argmax(1).tolist()
    if report is not None:
        return Predictions(answers, list(report.units_after), [m.cpu() for m in report.keep_masks])
    video_tokens = (batch["input_ids"] == model.config.video_token_id).sum(1).tolist()
    return Predictions(answers, video_tokens, [subsampled_mask(clip, row) for clip in clips])


def subsampled_mask(clip: Clip, row: Row) -> torch.Tensor | None:
    """Kept units of a row that does not prune: whole slots for subsampling, None (not comparable) otherwise."""
    if row.method != "subsample":
        return None
    slots, units = clip.changed.shape
    return kept_slots(slots, row)[:, None].expand(slots, units)


def evaluate(model: torch.nn.Module, clips: Sequence[Clip], row: Row, train: TrainSettings) -> dict[str, Any]:
    """Accuracy (overall and per question type), video tokens per clip, recall of the changing units."""
    model.eval()
    correct: dict[str, list[bool]] = {q: [] for q in QUESTION_TYPES}
    tokens, hits, changed = [], 0, 0
    for start in range(0, len(clips), train.eval_batch_size):
        chunk = clips[start : start + train.eval_batch_size]
        predictions = predict(model, chunk, row)
        tokens += predictions.video_tokens
        for clip, answer, mask in zip(chunk, predictions.answers, predictions.keep_masks):
            correct[QUESTION_TYPES[clip.question]].append(answer == clip.answer)
            if mask is not None:
                hits += int((mask & clip.changed).sum())
                changed += int(clip.changed.sum())
    every = [c for per_type in correct.values() for c in per_type]
    return {
        "accuracy": 100 * statistics.mean(every),
        "accuracy_per_type": {q: 100 * statistics.mean(c) for q, c in correct.items() if c},
        "video_tokens": statistics.mean(tokens),
        "recall": 100 * hits / changed if changed else None,
    }


def run(
    row: Row,
    seed: int,
    init: dict[str, torch.Tensor],
    video: VideoSettings,
    train: TrainSettings,
    clips: Sequence[Clip],
    progress: tqdm,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Fine-tune one row from the init with one seed (data order, scorer init, random masks), then evaluate."""
    start = time.perf_counter()
    model = build_model(row, seed, init, train)
    torch.manual_seed(20_000 + seed)  # the random method draws its training-time masks from torch's RNG
    stream = clip_stream("train", seed, video)
    losses, aux_losses = train_steps(
        model, row, stream, train.steps, train.lr, train, progress, f"{row.name} seed {seed}"
    )
    result = {
        "row": row.name,
        "seed": seed,
        **evaluate(model, clips, row, train),
        **first_and_last("loss", losses),
        **first_and_last("aux_loss", aux_losses),
        "seconds": time.perf_counter() - start,
    }
    return result, model


def first_and_last(name: str, values: list[float]) -> dict[str, float]:
    """Means of the first and the last tenth of a training curve (nothing for an empty one)."""
    if not values:
        return {}
    window = max(1, len(values) // 10)
    return {f"{name}_first": statistics.mean(values[:window]), f"{name}_last": statistics.mean(values[-window:])}


# ----------------------------------------------------------------------------------------------- reporting
def machine() -> str:
    """The CPU model, core count and torch version."""
    name = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} CPU ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}"


def summarize(results: list[dict[str, Any]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every row."""
    summary = []
    for row in rows:
        runs = [r for r in results if r["row"] == row.name]
        if not runs:
            continue
        accuracies = [r["accuracy"] for r in runs]
        recalls = [r["recall"] for r in runs if r["recall"] is not None]
        per_type = {q: statistics.mean(r["accuracy_per_type"][q] for r in runs) for q in runs[0]["accuracy_per_type"]}
        summary.append(
            {
                **asdict(row),
                "seeds": [r["seed"] for r in runs],
                "accuracy_mean": statistics.mean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                "accuracy_per_type": per_type,
                "video_tokens": statistics.mean(r["video_tokens"] for r in runs),
                "recall_mean": statistics.mean(recalls) if recalls else None,
            }
        )
    return summary


def claims(summary: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """The paper's claims, checked on the means: (claim, met, the numbers)."""
    acc = {s["name"]: s["accuracy_mean"] for s in summary}
    checks = []
    if {"baseline", "stts-50"} <= acc.keys():
        gap = acc["stts-50"] - acc["baseline"]
        checks.append(("STTS-50% within 1 point of the baseline", gap >= -1, f"{gap:+.1f} points"))
    for ratio in (50, 80):
        for other in ("random", "subsample"):
            names = (f"stts-{ratio}", f"{other}-{ratio}")
            if set(names) <= acc.keys():
                gap = acc[names[0]] - acc[names[1]]
                checks.append((f"STTS beats {other} at {ratio}%", gap > 0, f"{gap:+.1f} points"))
    if {"long-baseline", "long-stts-50-2x"} <= acc.keys():
        gap = acc["long-stts-50-2x"] - acc["long-baseline"]
        checks.append(("test-time scaling (STTS, 2x frames) beats the baseline", gap > 0, f"{gap:+.1f} points"))
    return checks


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The table, the test-time-scaling rows, the claims and the settings, as markdown."""
    summary, video, long, train = report["summary"], report["video"], report["long_video"], report["train"]
    seeds = sorted({seed for s in summary for seed in s["seeds"]})
    types = " | ".join(QUESTION_TYPES)
    header = [
        f"| row | video tokens | accuracy (mean ± std) | {types} | recall of changing units |",
        "|---|---|---|" + "---|" * len(QUESTION_TYPES) + "---|",
    ]

    def line(s: dict[str, Any]) -> str:
        per_type = " | ".join(f"{s['accuracy_per_type'].get(q, float('nan')):.1f}" for q in QUESTION_TYPES)
        return (
            f"| {s['name']} | {s['video_tokens']:.1f} | {s['accuracy_mean']:.1f} ± {s['accuracy_std']:.1f} "
            f"| {per_type} | {percent(s['recall_mean'])} |"
        )

    standard = [line(s) for s in summary if s["variant"] == "standard"]
    scaling = [line(s) for s in summary if s["variant"] == "long"]
    split = "test" if report["eval_split"] == "test" else "VALIDATION (not the reported test set)"
    quick = " (--quick: a smoke test, not the benchmark)" if report["quick"] else ""
    lines = [
        f"Synthetic video QA: {video['frames']} frames of {video['side']}x{video['side']} px "
        f"({video['frames'] // SLOT} temporal slots x {(video['side'] // CELL) ** 2} units) "
        "of a static textured scene; "
        "after the first slot a square appears (what colour?), moves out of the centre (which direction?), squares "
        f"flash for {video['flash']} slots (how many?), a square appears in a corner (which one?): 4 answers each, "
        f"chance 25%. {train['eval_size']} held-out {split} clips per set, generated apart from every training clip. "
        f"Seeds {', '.join(map(str, seeds))}; {report['machine']}, torch threads: {report['threads']}; "
        f"{report['seconds'] / 60:.1f} min in all{quick}.",
        "",
        f"Model: Qwen2.5-VL (ViT 5x64, LLM {TEXT_LAYERS}x{TEXT_WIDTH}), random init trained unpruned for "
        f"{train['pretrain_steps']} steps (the shared init), then every row fine-tuned end to end from it for "
        f"{train['steps']} steps (batch {train['batch_size']}, lr {train['lr']:g}, scorer lr {train['scorer_lr']:g}) "
        f"with its own pruning; STTS prune_layer {train['prune_layer']}. Frame subsampling keeps 1 temporal slot in "
        "2 (50%) or in 5 (80%: slots 0 and 5). Accuracy in %, mean ± std over seeds (a seed sets the fine-tuning "
        "data order, the scorer's init and the random masks; the init is shared). Video tokens: per video, as the "
        "LLM sees them. Recall: % of the ground-truth changing units (units that differ from the previous slot) "
        "that the row keeps.",
        "",
        *header,
        *standard,
    ]
    if scaling:
        lines += [
            "",
            f"Test-time scaling: long videos of {long['frames']} frames, the same questions, events on any frame, "
            f"flashes of {long['flash']} frame. The baseline sees every 2nd frame ({long['frames'] // 2} frames, so it "
            f"misses the flashes on odd frames); STTS sees all {long['frames']} frames and prunes 50%: the same "
            "number of video tokens. Both fine-tuned from the same init, as above.",
            "",
            *header,
            *scaling,
        ]
    lines += ["", "| paper's claim | met | measured |", "|---|---|---|"]
    lines += [f"| {claim} | {'yes' if met else 'no'} | {numbers} |" for claim, met, numbers in report["claims"]]
    lines += similarity_comparison(summary)
    return "\n".join(lines) + "\n"


def similarity_comparison(summary: list[dict[str, Any]]) -> list[str]:
    """STTS against the training-free similarity rule (not one of the paper's claims), with why it is strong here."""
    acc = {s["name"]: s["accuracy_mean"] for s in summary}
    ratios = [r for r in (50, 80) if {f"stts-{r}", f"similarity-{r}"} <= acc.keys()]
    if not ratios:
        return []
    gaps = ", ".join(f"{acc[f'stts-{r}'] - acc[f'similarity-{r}']:+.1f} points at {r}%" for r in ratios)
    return [
        "",
        f"STTS against the training-free similarity rule: {gaps}. The scenes are static up to sensor noise, "
        "so a unit's distance to the same unit one slot earlier marks exactly the units that change (see its recall): "
        "on this task the rule is close to an oracle of what matters. Whether that holds on real videos (camera "
        "motion, lighting, changes that do not answer the question) is not measured here.",
    ]


def plot(summary: list[dict[str, Any]], path: str) -> None:
    """Accuracy and recall against the fraction of video tokens removed, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    standard = [s for s in summary if s["variant"] == "standard"]
    baseline = next((s for s in standard if s["method"] == "none"), None)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, label in (
        ("scorer", "STTS"),
        ("random", "random"),
        ("similarity", "similarity"),
        ("subsample", "frame subsampling"),
    ):
        points = sorted((s for s in standard if s["method"] == method), key=lambda s: s["ratio"])
        if baseline is not None:
            points = [baseline, *points]
        if len(points) < 2:
            continue
        ratios = [100 * s["ratio"] for s in points]
        left.errorbar(
            ratios,
            [s["accuracy_mean"] for s in points],
            yerr=[s["accuracy_std"] for s in points],
            marker="o",
            capsize=3,
            label=label,
        )
        recalls = [(100 * s["ratio"], s["recall_mean"]) for s in points if s["recall_mean"] is not None]
        if recalls:
            right.plot(*zip(*recalls), marker="o", label=label)
    left.axhline(25, color="grey", linestyle=":", label="chance")
    left.set(xlabel="video tokens removed (%)", ylabel="test accuracy (%)", title="Accuracy (mean ± std over seeds)")
    right.set(xlabel="video tokens removed (%)", ylabel="recall (%)", title="Changing units kept", ylim=(0, 105))
    for axis in (left, right):
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_kept_units(model: torch.nn.Module, clips: Sequence[Clip], row: Row, path: str) -> None:
    """Frames of test clips with the units `model` pruned dimmed (stts_adapter.cli's renderer), stacked."""
    from PIL import Image

    model.eval()
    sheets = []
    for clip in clips:
        mask = predict(model, [clip], row).keep_masks[0]
        frames = clip.video
        grid = (frames.shape[-2] // CELL, frames.shape[-1] // CELL)
        keep = kept_pixels(mask, grid, *frames.shape[:1], *frames.shape[-2:])
        slot_of_frame = [t // SLOT for t in range(frames.shape[0])]
        question = QUESTION_TYPES[clip.question]
        captions = [f"#{t} kept {int(mask[s].sum())}/{mask.shape[1]}" for t, s in enumerate(slot_of_frame)]
        captions[0] = f"{question}: {ANSWERS[question][clip.answer]}"
        sheets.append(render_kept_units(frames, keep, captions, columns=8)[0])
    canvas = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), (255, 255, 255))
    top = 0
    for sheet in sheets:
        canvas.paste(sheet, (0, top))
        top += sheet.height
    canvas.save(path)


def picture_clips(clips: Sequence[Clip]) -> list[Clip]:
    """The first test clip of the direction and of the count question (things move and flash there)."""
    return [next(c for c in clips if c.question == QUESTION_TYPES.index(q)) for q in ("direction", "count")]


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--quick", action="store_true", help="baseline and STTS-50%%, 1 seed, short training")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: 0 1 2; quick: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="steps of the shared init")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per row")
    parser.add_argument("--eval-size", type=int, help="evaluation clips per set (balanced over question types)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test", help="tune on val, report on test")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite video_qa.md and video_qa.png from --out/video_qa.json"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> TrainSettings:
    train = replace(TrainSettings(), **QUICK) if args.quick else TrainSettings()
    overrides = {"pretrain_steps": args.pretrain_steps, "steps": args.steps, "eval_size": args.eval_size}
    return replace(train, **{k: v for k, v in overrides.items() if v is not None})


def write_outputs(report: dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "video_qa.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "video_qa.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    plot(report["summary"], os.path.join(out, "video_qa.png"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report written to `--out/video_qa.json`."""
    args = parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, "video_qa.json"), encoding="utf-8") as f:
            report = json.load(f)
        write_outputs(report, args.out)
        return report
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    train = settings_from(args)
    rows = [ROWS[name] for name in (args.rows or (QUICK_ROWS if args.quick else ROWS))]
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    videos = {"standard": VideoSettings(), "long": LONG_VIDEO}
    clips = {row.variant: clip_set(args.eval_split, train.eval_size, videos[row.variant]) for row in rows}
    os.makedirs(args.out, exist_ok=True)

    progress = tqdm(total=train.pretrain_steps + len(seeds) * len(rows) * train.steps, desc="training", unit="step")
    init = pretrain(videos["standard"], train, progress)
    results = []
    for seed in seeds:
        for row in rows:
            result, model = run(row, seed, init, videos[row.variant], train, clips[row.variant], progress)
            results.append(result)
            progress.write(f"{row.name} seed {seed}: accuracy {result['accuracy']:.1f}%")
            if row.name == "stts-50" and seed == seeds[0]:
                draw_kept_units(model, picture_clips(clips["standard"]), row, os.path.join(args.out, "kept_units.png"))
    progress.close()

    summary = summarize(results, rows)
    report = {
        "machine": machine(),
        "threads": args.threads,
        "quick": args.quick,
        "eval_split": args.eval_split,
        "seconds": time.perf_counter() - started,
        "video": asdict(videos["standard"]),
        "long_video": asdict(videos["long"]),
        "train": asdict(train),
        "runs": results,
        "summary": summary,
        "claims": claims(summary),
    }
    write_outputs(report, args.out)
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
