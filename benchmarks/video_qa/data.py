"""The synthetic videos and questions: how clips are drawn (`VideoSettings`, the events, the screens), the token
vocabulary of questions and answers, and the three tasks (`TASKS`)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from stts_adapter.testing import BOS

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
    """The tokens asking question type `question`."""
    return [21, QUESTION_TOKEN + question, 23]


def answer_token(question: int, answer: int) -> int:
    """The token of answer `answer` to question type `question`."""
    return ANSWER_TOKEN + 10 * question + answer


def candidate_tokens(question: int) -> list[int]:
    """The tokens of every answer to question type `question`."""
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
        """Event steps in a video."""
        return self.frames // self.tick

    @property
    def first_step(self) -> int:
        """The first step after the first temporal slot (which STTS always keeps whole: no answer there)."""
        return SLOT // self.tick

    @property
    def cells(self) -> int:
        """Units per frame side."""
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
        screens (`torch.Tensor` of shape `(units_per_slot,)`, bool): the units that show a distractor screen (all
            False without screens).
        objects (`torch.Tensor` of shape `(slots, units_per_slot)`, bool): units where a square the question's event
            drew is in view (`changed` and where it stays unchanged in later slots: a square that appeared still
            tells its colour and place).
    """

    video: torch.Tensor
    question: int
    answer: int
    changed: torch.Tensor
    screens: torch.Tensor
    objects: torch.Tensor


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
    slots = unit_view(clean)
    changed = any_pixel_differs(slots[1:] - slots[:-1])  # (slots - 1, units)
    return torch.cat([torch.zeros_like(changed[:1]), changed])


def units_off_background(clean: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """`(slots, units)` bool: units whose pixels differ from the static background in some frame of the slot."""
    return any_pixel_differs(unit_view(clean - background))


def unit_view(video: torch.Tensor) -> torch.Tensor:
    """`(frames, 3, H, W)` -> `(slots, SLOT, 3, rows, CELL, columns, CELL)`: one unit per (slot, row, column)."""
    frames, _, height, width = video.shape
    return video.reshape(frames // SLOT, SLOT, 3, height // CELL, CELL, width // CELL, CELL)


def any_pixel_differs(difference: torch.Tensor) -> torch.Tensor:
    """A `unit_view`-shaped pixel difference -> `(slots, units)` bool: some pixel of the unit differs."""
    return (difference.abs().amax(dim=(1, 2, 4, 6)) > 1e-6).flatten(1)


# A unit the question's event changed; one where its square stays in view, unchanged (the answer's change shows once,
# the square that tells its colour or place in every later slot); a distractor screen; the static background.
KINDS = ("answer", "object", "screen", "static")


def unit_kinds(clip: Clip) -> torch.Tensor:
    """`(slots, units)` index into `KINDS` of every unit of `clip`; -1 on the first slot (always kept, no change)."""
    kinds = torch.full_like(clip.changed, KINDS.index("static"), dtype=torch.long)
    kinds[:, clip.screens] = KINDS.index("screen")
    kinds[clip.objects] = KINDS.index("object")
    kinds[clip.changed] = KINDS.index("answer")
    kinds[0] = -1
    return kinds


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
    background = textured_background(settings, generator)
    clean = background.expand(settings.frames, -1, -1, -1).clone()
    answer = EVENTS[question](clean, rng, settings)
    changed = changed_units(clean)  # what the question is about (the screens are not)
    objects = units_off_background(clean, background)
    screens = torch.zeros(settings.cells, settings.cells, dtype=torch.bool)
    if settings.screens:
        used = changed.any(dim=0).view(settings.cells, settings.cells)
        free = [(r, c) for r in range(settings.cells) for c in range(settings.cells) if not used[r, c]]
        cells = rng.sample(free, min(settings.screens, len(free)))
        add_screens(clean, cells, generator)
        screens[tuple(zip(*cells))] = True
    noise = torch.randn(clean.shape, generator=generator) * settings.noise
    return Clip((clean + noise).clamp(0, 1), question, answer, changed, screens.flatten(), objects)


def clip_stream(split: str, seed: int, settings: VideoSettings) -> Iterator[Clip]:
    """Endless training clips of one seed: the same sequence for every row trained with that seed."""
    index = 0
    while True:
        yield make_clip(f"{split}/{settings}/{seed}/{index}", settings)
        index += 1


def clip_set(split: str, size: int, settings: VideoSettings) -> list[Clip]:
    """A fixed evaluation set, balanced over question types (separate names from every training stream)."""
    return [make_clip(f"{split}/{settings}/{i}", settings, i % len(QUESTION_TYPES)) for i in range(size)]


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
