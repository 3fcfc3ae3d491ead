"""Accuracy of STTS on synthetic video-QA tasks: the paper's table in miniature, and where a learned scorer must
beat the training-free rule.

Every video is a textured scene with sensor noise, 84x84 px (3x3 units per temporal slot); the answer lives in the
few units that change after the first slot: the colour of a square that appears, the direction a square moves in,
how many squares flash, which corner a square appears in (4 answers each: chance is 25%). Three tasks (`TASKS`):

- static: nothing else changes, so "keep what changed" (similarity pruning, vLLM's EVS) is close to an oracle;
- distractor: smaller squares, and 4 cells showing a new random picture on every frame (screens) that change more
  than the answer: the change rule must drop some of the answer at 50%;
- long: 32 frames with one-frame flashes, for test-time scaling (STTS on all frames at 50% against the baseline on
  every 2nd frame: the same video tokens).

A small Qwen2.5-VL (random init) is first trained unpruned on each task's videos (the shared init, cached in
`--cache` under a hash of its settings; the long task reuses the static one). Every row then runs in two regimes:
frozen (the base stays the init, only STTS's scorer trains: a user adding STTS to a trained VLM) and trained
(every parameter fine-tuned with the row's pruning: the paper's setting), the same steps and data per seed, and is
evaluated on held-out clips. Rows: baseline; STTS, random, similarity at 50% and 80%; frame subsampling at the same
token budget; on the distractor task the STTS-50 ablations (aux-only, lm-only, the paper's MSE aux loss). Recall:
the answer's changing units (screens excluded) that a row keeps.

Outputs in `--out`: video_qa.json (every run), video_qa.md (the tables and the claims), video_qa.png (accuracy
against the fraction of tokens removed) and kept_units.png / kept_units_distractor.png (kept units of STTS-50 with
the base frozen, on two test clips).

    python benchmarks/video_qa.py                          # everything (3 seeds), one worker per core
    python benchmarks/video_qa.py --quick --out /tmp/vqa   # baseline and STTS-50, 1 seed, short: a smoke test
    python benchmarks/video_qa.py --eval-split val --rows distractor-stts-50 --seeds 0   # tune on validation only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import (
    BOS,
    Sample,
    build_qwen_batch,
    special_tokens,
    tiny_qwen2_5_vl_config,
    tiny_text_config,
)
from stts_adapter.training import scorer_grad_norm, stts_parameter_groups
from stts_adapter.visualization import kept_pixels, render_kept_units

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
        object_side (`int`): side in pixels of the squares the questions are about (at most CELL: every object sits
            inside one unit).
        screens (`int`): distractors: cells (chosen among those the question's event leaves alone) that show a new
            random high-contrast picture on every frame, like a TV in the room or leaves in the wind. They change
            more, and in more units, than anything the question is about; at 50% pruning a rule that keeps what
            changes most cannot keep them all and the answer too.
    """

    frames: int = 16
    side: int = 84
    tick: int = 2
    flash: int = 2
    noise: float = 0.02
    object_side: int = CELL
    screens: int = 0

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
        changed (`torch.Tensor` of shape `(slots, units_per_slot)`, bool): units where the question's event changes
            the clean pixels from the previous temporal slot (what answers; the screens are left out; slot 0 is all
            False).
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


def draw(
    video: torch.Tensor, step_frames: range, cell: tuple[int, int], color: tuple[float, float, float], side: int
) -> None:
    """Paint a square of `side` pixels centred in `cell` on the frames of `step_frames`, in place."""
    margin = (CELL - side) // 2
    top, left = cell[0] * CELL + margin, cell[1] * CELL + margin
    video[step_frames.start : step_frames.stop, :, top : top + side, left : left + side] = torch.tensor(color)[
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
    draw(video, frames_of(settings, start_step(rng, settings)), cell, PALETTE[colour], settings.object_side)
    return colour


def add_direction_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """A square appears in the centre cell, one step later moves one cell right, left, down or up, and stays."""
    direction = rng.randrange(len(MOVES))
    centre, colour = settings.cells // 2, random_colour(rng)
    start = start_step(rng, settings, room=2)
    draw(video, frames_of(settings, start, start + 1), (centre, centre), colour, settings.object_side)
    draw(
        video,
        frames_of(settings, start + 1),
        (centre + MOVES[direction][0], centre + MOVES[direction][1]),
        colour,
        settings.object_side,
    )
    return direction


def add_count_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """1 to 4 flashes (a square lit for `settings.flash` steps at a random time), each in its own cell."""
    count = rng.randrange(4)
    cells = rng.sample([(r, c) for r in range(settings.cells) for c in range(settings.cells)], count + 1)
    for cell in cells:
        start = start_step(rng, settings, room=settings.flash)
        draw(video, frames_of(settings, start, start + settings.flash), cell, random_colour(rng), settings.object_side)
    return count


def add_corner_event(video: torch.Tensor, rng: random.Random, settings: VideoSettings) -> int:
    """A square appears in one corner of the frame and stays."""
    corner = rng.randrange(4)
    last = settings.cells - 1
    cell = ((corner // 2) * last, (corner % 2) * last)
    draw(video, frames_of(settings, start_step(rng, settings)), cell, random_colour(rng), settings.object_side)
    return corner


EVENTS = (add_colour_event, add_direction_event, add_count_event, add_corner_event)


def changed_units(clean: torch.Tensor) -> torch.Tensor:
    """`(slots, units)` bool: units whose pixels differ from the same unit one temporal slot earlier."""
    frames, _, height, width = clean.shape
    slots = clean.reshape(frames // SLOT, SLOT, 3, height // CELL, CELL, width // CELL, CELL)
    difference = (slots[1:] - slots[:-1]).abs().amax(dim=(1, 2, 4, 6))  # (slots - 1, rows, columns)
    changed = torch.cat([torch.zeros_like(difference[:1]), difference]) > 1e-6
    return changed.flatten(1)


def add_screens(video: torch.Tensor, cells: list[tuple[int, int]], generator: torch.Generator) -> None:
    """A new random picture (14 px blocks of any colour) in each of `cells` on every frame, in place."""
    frames = video.shape[0]
    for row, column in cells:
        blocks = torch.rand(frames, 3, CELL // 14, CELL // 14, generator=generator)
        picture = blocks.repeat_interleave(14, 2).repeat_interleave(14, 3)
        video[:, :, row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = picture


def make_clip(name: str, settings: VideoSettings, question: int | None = None) -> Clip:
    """The clip called `name` (deterministic: the same name always gives the same clip)."""
    rng = random.Random(name)
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    question = rng.randrange(len(QUESTION_TYPES)) if question is None else question
    clean = textured_background(settings, generator).expand(settings.frames, -1, -1, -1).clone()
    answer = EVENTS[question](clean, rng, settings)
    changed = changed_units(clean)  # what the question is about (the screens are not)
    if settings.screens:
        used = changed.any(dim=0).view(settings.cells, settings.cells)
        free = [(r, c) for r in range(settings.cells) for c in range(settings.cells) if not used[r, c]]
        add_screens(clean, rng.sample(free, min(settings.screens, len(free))), generator)
    noise = torch.randn(clean.shape, generator=generator) * settings.noise
    return Clip((clean + noise).clamp(0, 1), question, answer, changed)


def clip_stream(split: str, seed: int, settings: VideoSettings) -> Iterator[Clip]:
    """Endless training clips of one seed: the same sequence for every row trained with that seed."""
    index = 0
    while True:
        yield make_clip(f"{split}/{settings}/{seed}/{index}", settings)
        index += 1


def clip_set(split: str, size: int, settings: VideoSettings) -> list[Clip]:
    """A fixed evaluation set, balanced over question types (separate names from every training stream)."""
    return [make_clip(f"{split}/{settings}/{i}", settings, i % len(QUESTION_TYPES)) for i in range(size)]


# ----------------------------------------------------------------------------------------------- tasks and rows
TASKS = {
    # A static scene: the units that change are exactly the answer's (the training-free rule's best case).
    "static": VideoSettings(),
    # Small objects and 4 flickering screens: the screens change more than the answer does, in more units than half
    # the budget leaves after the answer's, so a rule that keeps what changes most must drop some of the answer.
    "distractor": VideoSettings(object_side=14, screens=4),
    # Test-time scaling: 32 frames, events on any frame, one-frame flashes (the static scene, its init reused).
    "long": VideoSettings(frames=32, tick=1, flash=1),
}
INIT_OF_TASK = {"static": "static", "distractor": "distractor", "long": "static"}
REGIMES = ("frozen", "trained")


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Args:
        name (`str`): its label (unique over all tasks).
        method (`str`): "none" (unpruned), "scorer", "random", "similarity" (STTS methods) or "subsample" (uniform
            temporal-slot subsampling).
        ratio (`float`): fraction of video tokens removed (the prune ratio, or the subsampling's target).
        task (`str`): the video set, a key of `TASKS`.
        frame_stride (`int`): keep every n-th frame of the video before anything else (the long set's baseline
            samples half the frames, as a fixed frame budget does).
        options (`tuple`): `(field, value)` pairs overriding `STTSConfig` defaults: the ablations.
        two_phase (`bool`): trained regime only: the scorer alone on the frozen base for the row's steps, then the base
            alone with the scorer frozen for as many steps (`STTSModel.set_trainable`, as
            `STTSCallback(scorer_first_steps=...)` does).
    """

    name: str
    method: str
    ratio: float = 0.0
    task: str = "static"
    frame_stride: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    two_phase: bool = False

    @property
    def regimes(self) -> tuple[str, ...]:
        """A two-phase row is the lm-penalty row in the frozen regime (its second phase would train nothing)."""
        return ("trained",) if self.two_phase else REGIMES

    @property
    def prunes(self) -> bool:
        return self.method in ("scorer", "random", "similarity")

    @property
    def trains_in_frozen_regime(self) -> bool:
        """Only a learned scorer has something to train when the base model is frozen."""
        return self.method == "scorer"

    @property
    def slot_stride(self) -> int:
        """Subsampling keeps 1 temporal slot in this many: 1 / (1 - ratio), rounded (50% -> 2, 80% -> 5)."""
        return round(1 / (1 - self.ratio)) if self.method == "subsample" else 1


ABLATIONS = (
    ("aux-only", (("key_bias", False),)),  # no soft key bias: the LM loss cannot reach the scorer
    ("lm-only", (("aux_loss_weight", 0.0),)),  # no temporal aux loss: the scorer learns from the answer only
    ("mse", (("aux_loss", "mse"),)),  # the paper's aux loss (MSE of the sigmoid against 1 - cos)
)

# The scorer trained by the LM loss alone, its logits kept in the sigmoid's slope by the logit penalty (tuned on
# the validation split: 0.01 over 0.001, seeds 0 and 1, distractor task, base frozen).
LM_PENALTY = (("aux_loss_weight", 0.0), ("logit_penalty_weight", 0.01))


def task_rows(task: str, prefix: str, ablations: bool) -> list[Row]:
    """Baseline, STTS, random, similarity and subsampling at 50% and 80% (and the STTS-50 ablations) of one task."""
    rows = [Row(f"{prefix}baseline", "none", task=task)]
    for method, label in (
        ("scorer", "stts"),
        ("random", "random"),
        ("similarity", "similarity"),
        ("subsample", "subsample"),
    ):
        rows += [Row(f"{prefix}{label}-{percent}", method, percent / 100, task) for percent in (50, 80)]
    rows += [
        Row(f"{prefix}stts-{percent}-lm-penalty", "scorer", percent / 100, task, options=LM_PENALTY)
        for percent in (50, 80)
    ]
    rows += [
        Row(f"{prefix}stts-{percent}-two-phase", "scorer", percent / 100, task, options=LM_PENALTY, two_phase=True)
        for percent in (50, 80)
    ]
    if ablations:
        rows += [Row(f"{prefix}stts-50-{name}", "scorer", 0.5, task, options=options) for name, options in ABLATIONS]
    return rows


ROWS = {
    row.name: row
    for row in (
        *task_rows("static", "", ablations=False),
        *task_rows("distractor", "distractor-", ablations=True),
        Row("long-baseline", "none", task="long", frame_stride=2),
        Row("long-stts-50-2x", "scorer", 0.5, task="long"),
        Row("long-stts-50-2x-lm-penalty", "scorer", 0.5, task="long", options=LM_PENALTY),
        Row("long-stts-50-2x-two-phase", "scorer", 0.5, task="long", options=LM_PENALTY, two_phase=True),
    )
}
QUICK_ROWS = ("baseline", "stts-50")
# The picture of kept units: STTS-50 on the static and on the distractor task, seed 0, base frozen.
PICTURE_ROWS = {"stts-50": "kept_units.png", "distractor-stts-50": "kept_units_distractor.png"}


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
        pretrain_steps (`int`): steps of the static task's init: the unpruned model trained on its videos (the
            paper fine-tunes a trained video VLM, Molmo2-4B; this is its miniature).
        distractor_pretrain_steps (`int`): steps of the distractor task's init (small objects among screens take
            longer to learn).
        steps (`int`): training steps of every row, from its task's init (the scorer alone when the base is frozen,
            every parameter when it is trained).
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
    distractor_pretrain_steps: int = 1500
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


QUICK = dict(pretrain_steps=240, distractor_pretrain_steps=240, steps=40, batch_size=8, eval_size=96)
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


@dataclass
class Curves:
    """What one training run logged at every step (the STTS lists stay empty without a learned scorer)."""

    loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    saturated_fraction: list[float] = field(default_factory=list)
    scorer_grad_norm: list[float] = field(default_factory=list)

    def extend(self, other: Curves) -> None:
        """Append the curves of a later phase of the same run."""
        for name in asdict(self):
            getattr(self, name).extend(getattr(other, name))

    def summary(self) -> dict[str, float]:
        return {k: v for name in asdict(self) for k, v in first_and_last(name, getattr(self, name)).items()}


def train_steps(
    model: torch.nn.Module,
    row: Row,
    stream: Iterator[Clip],
    steps: int,
    peak_lr: float,
    train: TrainSettings,
    label: str,
) -> Curves:
    """Train every trainable parameter with the model's own loss (LM loss on the answer, + STTS's aux loss)."""
    optimizer = optimizer_for(model, peak_lr, train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step, steps, train.warmup))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    curves = Curves()
    for step in range(steps):
        batch = build_batch(model.config, [next(stream) for _ in range(train.batch_size)], row)
        out = model(**batch)
        out.loss.backward()
        report = getattr(out, "stts", None)
        if report is not None and report.saturated_fraction is not None:
            curves.saturated_fraction.append(report.saturated_fraction)
            curves.scorer_grad_norm.append(scorer_grad_norm(model) or 0.0)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curves.loss.append(out.loss.item())
        if report is not None and report.aux_loss is not None:
            curves.aux_loss.append(report.aux_loss.item())
        if (step + 1) % 100 == 0:
            print(f"  {label}: step {step + 1}/{steps}, loss {statistics.mean(curves.loss[-100:]):.3f}", flush=True)
    return curves


def first_and_last(name: str, values: list[float]) -> dict[str, float]:
    """Means of the first and the last tenth of a training curve (nothing for an empty one)."""
    if not values:
        return {}
    window = max(1, len(values) // 10)
    return {f"{name}_first": statistics.mean(values[:window]), f"{name}_last": statistics.mean(values[-window:])}


def pretrain_steps_of(init: str, train: TrainSettings) -> int:
    return train.distractor_pretrain_steps if init == "distractor" else train.pretrain_steps


def init_key(init: str, train: TrainSettings) -> str:
    """What an init depends on, as a short hash: its videos, its training settings and the model's config."""
    settings = {
        "video": asdict(TASKS[init]),
        "steps": pretrain_steps_of(init, train),
        "lr": train.pretrain_lr,
        "batch_size": train.batch_size,
        "warmup": train.warmup,
        "weight_decay": train.weight_decay,
        "model": model_config().to_dict(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def init_path(init: str, train: TrainSettings, cache: str) -> str:
    return os.path.join(cache, f"init-{init}-{init_key(init, train)}.safetensors")


def pretrain(init: str, train: TrainSettings, cache: str) -> str:
    """The shared init of a task: a random model trained unpruned on its videos, cached as safetensors under its
    key (reused while the videos, the training settings and the model config stay the same). Returns its path."""
    path = init_path(init, train, cache)
    if os.path.isfile(path):
        return path
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(model_config())
    stream = clip_stream("pretrain", 0, TASKS[init])
    train_steps(
        model, ROWS["baseline"], stream, pretrain_steps_of(init, train), train.pretrain_lr, train, f"init {init}"
    )
    os.makedirs(cache, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    save_model(model, partial)
    os.replace(partial, path)  # whole or absent: a killed run never leaves half an init in the cache
    return path


def build_model(row: Row, regime: str, seed: int, init: str, train: TrainSettings) -> torch.nn.Module:
    """The init, wrapped with STTS for the pruning rows (the base trainable in the trained regime only; the scorer
    seeded by `seed`)."""
    model = Qwen2_5_VLForConditionalGeneration(model_config())
    load_model(model, init)
    if not row.prunes:
        model.requires_grad_(regime == "trained")
        return model
    torch.manual_seed(10_000 + seed)
    config = STTSConfig(
        prune_ratio=row.ratio,
        prune_layer=train.prune_layer,
        method=row.method,
        train_base_model=regime == "trained",
        seed=seed,
        **dict(row.options),
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
    """Accuracy (overall and per question type), video tokens per clip, recall of the answer's changing units."""
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


@dataclass(frozen=True)
class Job:
    """One run: a row, trained (or not) in one regime with one seed, then evaluated.

    Args:
        row (`str`): a key of `ROWS`.
        regime (`str`): "frozen" (the base model stays as the init; only a learned scorer trains) or "trained" (every
            parameter fine-tuned, the paper's setting).
        seed (`int`): the fine-tuning data order, the scorer's init and the random masks (the init is shared).
        init (`str`): path of the cached init.
        picture (`str`, *optional*): where to draw the kept units of two test clips after training.
    """

    row: str
    regime: str
    seed: int
    init: str
    picture: str | None = None


def run(job: Job, train: TrainSettings, eval_split: str, threads: int) -> dict[str, Any]:
    """Fine-tune one row from its task's init (unless it has nothing to train in its regime), then evaluate it on
    the task's evaluation set."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    row = ROWS[job.row]
    video = TASKS[row.task]
    model = build_model(row, job.regime, job.seed, job.init, train)
    torch.manual_seed(20_000 + job.seed)  # the random method draws its training-time masks from torch's RNG
    curves = Curves()
    label = f"{job.row} {job.regime} seed {job.seed}"
    stream = clip_stream("train", job.seed, video)
    if row.two_phase:
        model.set_trainable(scorer=True, base=False)
        curves = train_steps(model, row, stream, train.steps, train.lr, train, f"{label}, scorer phase")
        model.set_trainable(scorer=False, base=True)
        curves.extend(train_steps(model, row, stream, train.steps, train.lr, train, f"{label}, base phase"))
    elif job.regime == "trained" or row.trains_in_frozen_regime:
        curves = train_steps(model, row, stream, train.steps, train.lr, train, label)
    clips = clip_set(eval_split, train.eval_size, video)
    if job.picture:
        draw_kept_units(model, picture_clips(clips), row, job.picture)
    return {
        "row": job.row,
        "regime": job.regime,
        "seed": job.seed,
        **evaluate(model, clips, row, train),
        **curves.summary(),
        "seconds": time.perf_counter() - start,
    }


def run_all(jobs: list[Job], train: TrainSettings, eval_split: str, workers: int) -> list[dict[str, Any]]:
    """Every job, in `workers` processes of one torch thread each (tiny models use one core better than two threads
    do), or in this process with all its threads when `workers` is 1. Results in the order of `jobs`."""
    if workers == 1:
        return [report_run(run(job, train, eval_split, torch.get_num_threads())) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run, job, train, eval_split, 1) for job in jobs]
        for future in as_completed(futures):
            report_run(future.result())
        return [future.result() for future in futures]


def report_run(result: dict[str, Any]) -> dict[str, Any]:
    print(
        f"{result['row']} {result['regime']} seed {result['seed']}: accuracy {result['accuracy']:.1f}% "
        f"({result['seconds']:.0f} s)",
        flush=True,
    )
    return result


def pretrain_all(inits: list[str], train: TrainSettings, cache: str, workers: int) -> dict[str, str]:
    """The cached path of every init, pretraining the missing ones (in parallel when `workers` > 1)."""
    if workers == 1 or len(inits) == 1:
        return {init: pretrain(init, train, cache) for init in inits}
    with ProcessPoolExecutor(min(workers, len(inits)), mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = pool.map(pretrain_in_worker, inits, [train] * len(inits), [cache] * len(inits))
        return dict(zip(inits, paths))


def pretrain_in_worker(init: str, train: TrainSettings, cache: str) -> str:
    torch.set_num_threads(1)
    return pretrain(init, train, cache)


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


def mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def summarize(results: list[dict[str, Any]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every row in every regime it ran in."""
    summary = []
    for row in rows:
        for regime in REGIMES:
            runs = [r for r in results if r["row"] == row.name and r["regime"] == regime]
            if not runs:
                continue
            accuracies = [r["accuracy"] for r in runs]
            types = runs[0]["accuracy_per_type"]
            summary.append(
                {
                    **asdict(row),
                    "regime": regime,
                    "seeds": [r["seed"] for r in runs],
                    "accuracy_mean": statistics.mean(accuracies),
                    "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                    "accuracy_per_type": {q: statistics.mean(r["accuracy_per_type"][q] for r in runs) for q in types},
                    "video_tokens": statistics.mean(r["video_tokens"] for r in runs),
                    **{
                        key: mean_of(runs, key)
                        for key in ("recall", "saturated_fraction_last", "scorer_grad_norm_last", "aux_loss_last")
                    },
                }
            )
    return summary


# (claim, row, other row, margin: met when accuracy(row) - accuracy(other) > margin, or >= when `inclusive`)
CLAIMS = (
    ("paper: STTS-50% within 1 point of the baseline", "stts-50", "baseline", -1.0, True),
    ("paper: STTS beats random at 50%", "stts-50", "random-50", 0.0, False),
    ("paper: STTS beats random at 80%", "stts-80", "random-80", 0.0, False),
    ("paper: STTS beats frame subsampling at 50%", "stts-50", "subsample-50", 0.0, False),
    ("paper: STTS beats frame subsampling at 80%", "stts-80", "subsample-80", 0.0, False),
    (
        "paper: test-time scaling (STTS, 2x frames, 50%) beats the baseline",
        "long-stts-50-2x",
        "long-baseline",
        0,
        False,
    ),
    ("goal: STTS-50% >= similarity-50%", "stts-50", "similarity-50", 0.0, True),
    ("goal: STTS-80% >= similarity-80% - 1", "stts-80", "similarity-80", -1.0, True),
    ("goal: STTS-80% >= random-80% + 10", "stts-80", "random-80", 10.0, True),
    ("goal: distractors: STTS-50% >= similarity-50% + 5", "distractor-stts-50", "distractor-similarity-50", 5.0, True),
    ("lm-penalty: STTS-50% within 1 point of the baseline", "stts-50-lm-penalty", "baseline", -1.0, True),
    ("lm-penalty: STTS-50% >= similarity-50%", "stts-50-lm-penalty", "similarity-50", 0.0, True),
    ("lm-penalty: STTS-80% >= similarity-80% - 1", "stts-80-lm-penalty", "similarity-80", -1.0, True),
    ("lm-penalty: STTS-80% >= random-80% + 10", "stts-80-lm-penalty", "random-80", 10.0, True),
    (
        "lm-penalty: distractors: STTS-50% >= similarity-50% + 5",
        "distractor-stts-50-lm-penalty",
        "distractor-similarity-50",
        5.0,
        True,
    ),
    (
        "lm-penalty: test-time scaling (STTS, 2x frames, 50%) beats the baseline",
        "long-stts-50-2x-lm-penalty",
        "long-baseline",
        0,
        False,
    ),
    ("two-phase: STTS-50% within 1 point of the baseline", "stts-50-two-phase", "baseline", -1.0, True),
    ("two-phase: STTS-50% >= similarity-50%", "stts-50-two-phase", "similarity-50", 0.0, True),
    ("two-phase: STTS-80% >= similarity-80% - 1", "stts-80-two-phase", "similarity-80", -1.0, True),
    ("two-phase: STTS-80% >= random-80% + 10", "stts-80-two-phase", "random-80", 10.0, True),
    (
        "two-phase: distractors: STTS-50% >= similarity-50% + 5",
        "distractor-stts-50-two-phase",
        "distractor-similarity-50",
        5.0,
        True,
    ),
    (
        "two-phase: test-time scaling (STTS, 2x frames, 50%) beats the baseline",
        "long-stts-50-2x-two-phase",
        "long-baseline",
        0,
        False,
    ),
)


def claims(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims and this project's goals, checked on the means of each regime."""
    accuracy = {(s["name"], s["regime"]): s["accuracy_mean"] for s in summary}
    checks = []
    for claim, row, other, margin, inclusive in CLAIMS:
        for regime in REGIMES:
            if (row, regime) in accuracy and (other, regime) in accuracy:
                gap = accuracy[row, regime] - accuracy[other, regime]
                met = gap >= margin if inclusive else gap > margin
                checks.append({"claim": claim, "regime": regime, "met": met, "gap": gap})
    return checks


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """The tables (one per task, both regimes side by side), the scorer's health, the claims and the settings."""
    summary, train = report["summary"], report["train"]
    by_key = {(s["name"], s["regime"]): s for s in summary}
    seeds = sorted({seed for s in summary for seed in s["seeds"]})
    split = "test" if report["eval_split"] == "test" else "VALIDATION (not the reported test set)"
    quick = " (--quick: a smoke test, not the benchmark)" if report["quick"] else ""
    lines = [
        f"Synthetic video QA, 4 questions with 4 answers each (chance 25%), {train['eval_size']} held-out {split} "
        f"clips per task, generated apart from every training clip. Seeds {', '.join(map(str, seeds))}; "
        f"{report['machine']}, {report['workers']} worker(s); {report['seconds'] / 60:.1f} min in all{quick}.",
        "",
        "- **static**: 16 frames of 84x84 px (8 temporal slots x 9 units) of a static textured scene with sensor "
        "noise; after the first slot a square appears (what colour?), moves out of the centre (which direction?), "
        "flashes (how many?), appears in a corner (which one?). What changes is exactly what answers: the "
        "training-free rule's best case.",
        "- **distractor**: the same questions about 14 px squares, and 4 cells showing a new random picture every "
        "frame (screens): they change more than the answer does, so at 50% a rule that keeps what changes most "
        "must drop some of the answer. The learned scorer's reason to exist.",
        "- **long** (test-time scaling): 32 frames, events on any frame, one-frame flashes. The baseline sees every "
        "2nd frame (it misses flashes on odd frames); STTS sees all 32 and prunes 50%: the same video tokens.",
        "",
        f"Model: Qwen2.5-VL (ViT 5x64, LLM {TEXT_LAYERS}x{TEXT_WIDTH}) trained unpruned from a random init on each "
        f"task's videos (the shared init: {train['pretrain_steps']} steps on static, also used for long, "
        f"{train['distractor_pretrain_steps']} on distractor). Then every row for {train['steps']} steps (batch "
        f"{train['batch_size']}, lr {train['lr']:g}, scorer lr {train['scorer_lr']:g}, prune_layer "
        f"{train['prune_layer']}), in two regimes: **frozen**, the base model stays the init and only STTS's scorer "
        "trains (a user adding STTS to a trained VLM; the training-free rows are the init evaluated as is), and "
        "**trained**, every parameter fine-tuned with the row's pruning (the paper's setting). Accuracy in %, mean "
        "± std over seeds (a seed sets the data order, the scorer's init and the random masks). Video tokens: per "
        "video, as the LLM sees them. Recall: % of the units the question's event changes (screens excluded) that "
        "the row keeps. Subsampling keeps 1 temporal slot in 2 (50%) or 5 (80%). Ablations of STTS-50: aux-only "
        "(`key_bias=False`: no LM gradient reaches the scorer), lm-only (`aux_loss_weight=0`), mse (the paper's "
        "aux loss, `aux_loss='mse'`). lm-penalty rows: STTS trained by the LM loss alone "
        "(`aux_loss_weight=0`) with `logit_penalty_weight=0.01`, which keeps its logits unsaturated. two-phase rows "
        f"(trained regime only): the lm-penalty scorer trained alone on the frozen init for {train['steps']} steps, "
        f"then the base trained with the scorer frozen for {train['steps']} steps (as many base-training steps as "
        "every other trained row, plus the scorer's phase; `STTSCallback(scorer_first_steps=...)`).",
    ]
    for task in TASKS:
        names = [
            row.name for row in ROWS.values() if row.task == task and any((row.name, r) in by_key for r in REGIMES)
        ]
        if not names:
            continue
        lines += [
            "",
            f"**{task}**",
            "",
            "| row | video tokens | frozen: accuracy | frozen: recall | trained: accuracy | trained: recall |",
            "|---|---|---|---|---|---|",
        ]
        for name in names:
            cells = []
            for regime in REGIMES:
                s = by_key.get((name, regime))
                cells += (
                    ["-", "-"]
                    if s is None
                    else [
                        f"{s['accuracy_mean']:.1f} ± {s['accuracy_std']:.1f}",
                        percent(s["recall"]),
                    ]
                )
            tokens = next(by_key[name, r]["video_tokens"] for r in REGIMES if (name, r) in by_key)
            lines.append(f"| {name} | {tokens:.1f} | {' | '.join(cells)} |")
    health = [s for s in summary if s["saturated_fraction_last"] is not None]
    if health:
        lines += [
            "",
            "The learned scorer over the last tenth of its training (means over seeds): saturated scores (within "
            "1e-4 of 0 or 1, where the sigmoid passes no gradient), the scorer's gradient norm before clipping, the "
            "aux loss.",
            "",
            "| row | regime | saturated | scorer grad norm | aux loss |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['name']} | {s['regime']} | {s['saturated_fraction_last']:.3f} | {s['scorer_grad_norm_last']:.2e} "
            f"| {percent(s['aux_loss_last']) if s['aux_loss_last'] is None else format(s['aux_loss_last'], '.4f')} |"
            for s in health
        ]
    checks = report["claims"]
    if checks:
        lines += ["", "| claim (paper's, or this project's goal) | frozen | trained |", "|---|---|---|"]
        for claim in dict.fromkeys(c["claim"] for c in checks):
            cells = []
            for regime in REGIMES:
                c = next((c for c in checks if c["claim"] == claim and c["regime"] == regime), None)
                cells.append("-" if c is None else f"{'yes' if c['met'] else 'no'} ({c['gap']:+.1f} points)")
            lines.append(f"| {claim} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict[str, Any]], path: str) -> None:
    """Accuracy against the fraction of video tokens removed, one line per method, one panel per task and regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (t, r)
        for t in ("static", "distractor")
        for r in REGIMES
        if any(s["task"] == t and s["regime"] == r for s in summary)
    ]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (task, regime) in zip(axes[0], panels):
        points = [s for s in summary if s["task"] == task and s["regime"] == regime and not s["options"]]
        baseline = next((s for s in points if s["method"] == "none"), None)
        for method, label in (
            ("scorer", "STTS"),
            ("random", "random"),
            ("similarity", "similarity"),
            ("subsample", "subsampling"),
        ):
            line = sorted((s for s in points if s["method"] == method), key=lambda s: s["ratio"])
            line = ([baseline] if baseline else []) + line
            if len(line) < 2:
                continue
            axis.errorbar(
                [100 * s["ratio"] for s in line],
                [s["accuracy_mean"] for s in line],
                yerr=[s["accuracy_std"] for s in line],
                marker="o",
                capsize=3,
                label=label,
            )
        axis.axhline(25, color="grey", linestyle=":", label="chance")
        axis.set(
            xlabel="video tokens removed (%)", ylabel="test accuracy (%)", title=f"{task}, base {regime}", ylim=(0, 100)
        )
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def draw_kept_units(model: torch.nn.Module, clips: Sequence[Clip], row: Row, path: str) -> None:
    """Frames of test clips with the units `model` pruned dimmed (stts_adapter.visualization), stacked."""
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
    parser.add_argument("--cache", default="benchmarks/.cache", help="folder of the cached inits (safetensors)")
    parser.add_argument("--quick", action="store_true", help="baseline and STTS-50%%, 1 seed, short training")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, help="regimes to run (default: both)")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: 0 1 2; quick: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="steps of the static task's init")
    parser.add_argument("--distractor-pretrain-steps", type=int, help="steps of the distractor task's init")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per row")
    parser.add_argument("--eval-size", type=int, help="evaluation clips per task (balanced over question types)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test", help="tune on val, report on test")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes of 1 thread each (1: this process)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite video_qa.md and video_qa.png from --out/video_qa.json"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="run --rows only and put their runs into --out/video_qa.json in place of any earlier runs of them (the "
        "report must have the same settings, split and seeds); the tables are recomputed from all runs",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> TrainSettings:
    train = replace(TrainSettings(), **QUICK) if args.quick else TrainSettings()
    overrides = {
        "pretrain_steps": args.pretrain_steps,
        "distractor_pretrain_steps": args.distractor_pretrain_steps,
        "steps": args.steps,
        "eval_size": args.eval_size,
    }
    return replace(train, **{k: v for k, v in overrides.items() if v is not None})


def write_outputs(report: dict[str, Any], out: str) -> None:
    with open(os.path.join(out, "video_qa.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "video_qa.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report))
    plot(report["summary"], os.path.join(out, "video_qa.png"))


def plan(
    rows: Sequence[Row], regimes: Sequence[str], seeds: Sequence[int], inits: dict[str, str], out: str
) -> list[Job]:
    """Every (row, regime, seed) run, the longest first (training end to end, then the scorer alone, then
    evaluation only) so that the workers finish together."""
    jobs = []
    for row in rows:
        for regime in (r for r in regimes if r in row.regimes):
            for seed in seeds:
                picture = PICTURE_ROWS.get(row.name) if regime == "frozen" and seed == seeds[0] else None
                init = inits[INIT_OF_TASK[row.task]]
                jobs.append(Job(row.name, regime, seed, init, os.path.join(out, picture) if picture else None))

    def cost(job: Job) -> int:
        row = ROWS[job.row]
        return 3 if row.two_phase else 2 if job.regime == "trained" else int(row.trains_in_frozen_regime)

    return sorted(jobs, key=cost, reverse=True)


def earlier_runs(args: argparse.Namespace, train: TrainSettings, seeds: Sequence[int]) -> dict[str, Any]:
    """The report in `--out` that `--merge` adds to, refused unless it was made with the same settings."""
    if not args.rows:
        raise SystemExit("--merge needs --rows: the rows to run again or to add.")
    with open(os.path.join(args.out, "video_qa.json"), encoding="utf-8") as f:
        report = json.load(f)
    same = (report["train"], report["eval_split"], report["quick"]) == (asdict(train), args.eval_split, args.quick)
    if not same or sorted({r["seed"] for r in report["runs"]}) != sorted(seeds):
        raise SystemExit(f"--merge: {args.out}/video_qa.json was made with other settings, split or seeds.")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report written to `--out/video_qa.json`."""
    args = parse_args(argv)
    if args.render:
        with open(os.path.join(args.out, "video_qa.json"), encoding="utf-8") as f:
            report = json.load(f)
        write_outputs(report, args.out)
        return report
    started = time.perf_counter()
    train = settings_from(args)
    rows = [ROWS[name] for name in (args.rows or (QUICK_ROWS if args.quick else ROWS))]
    regimes = args.regimes or REGIMES
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    os.makedirs(args.out, exist_ok=True)
    workers = max(1, args.jobs)
    inits = pretrain_all(sorted({INIT_OF_TASK[row.task] for row in rows}), train, args.cache, workers)
    earlier = earlier_runs(args, train, seeds) if args.merge else {"runs": [], "seconds": 0.0}
    jobs = plan(rows, regimes, seeds, inits, args.out)
    results = run_all(jobs, train, args.eval_split, workers)
    replaced = {(job.row, job.regime) for job in jobs}
    results = [r for r in earlier["runs"] if (r["row"], r["regime"]) not in replaced] + results
    if args.merge:
        rows = [row for row in ROWS.values() if any(r["row"] == row.name for r in results)]
    summary = summarize(results, rows)
    report = {
        "machine": machine(),
        "workers": workers,
        "quick": args.quick,
        "eval_split": args.eval_split,
        "seconds": earlier["seconds"] + time.perf_counter() - started,
        "tasks": {task: asdict(video) for task, video in TASKS.items()},
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
