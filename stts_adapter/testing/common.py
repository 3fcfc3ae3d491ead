"""What every family's test helpers share: special token ids, the tiny LLM config, synthetic videos, samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..processing import write_video_file
from ..sequence import pad_token_id

# Special token ids of the tiny configs: inside the vocabulary, above every "word" id.
VOCAB_SIZE = 1000
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 995, 996, 997, 998
WORD_IDS = (3, 990)


def tiny_text_config(
    hidden_size: int = 64, num_hidden_layers: int = 2, intermediate_size: int = 128, mrope: bool = True, **extra: Any
) -> dict:
    """A tiny decoder config (4 heads, 2 KV heads, vocab 1000, special ids inside the vocab).

    Args:
        hidden_size, num_hidden_layers, intermediate_size (`int`): its size.
        mrope (`bool`): add M-RoPE sections (t, h, w) for Qwen-VL language models.
        **extra: other fields (e.g. `model_type="qwen2"` for a nested config).
    """
    head_dim = hidden_size // 4
    half = head_dim // 2  # the M-RoPE sections (t, h, w) split head_dim / 2
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if mrope:
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rope_parameters=rope,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        **extra,
    )


def special_tokens() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


# ------------------------------------------------------------------------------------------------ videos
def moving_square_video(
    frames: int = 8,
    height: int = 112,
    width: int = 112,
    square: int = 28,
    color: tuple[float, float, float] = (1.0, 0.1, 0.1),
    step: tuple[int, int] = (0, 14),
    start: tuple[int, int] = (14, 0),
    seed: int = 0,
) -> torch.Tensor:
    """A static textured background with one coloured square moving across it.

    Args:
        frames, height, width (`int`): video size.
        square (`int`): side of the square in pixels.
        color (`tuple`): RGB in [0, 1].
        step (`tuple`): (dy, dx) pixels the square moves per frame.
        start (`tuple`): (y, x) of its top-left corner in frame 0.
        seed (`int`): seed of the background texture.

    Returns:
        `torch.Tensor` of shape `(frames, 3, height, width)` in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    background = torch.rand(3, -(-height // 14), -(-width // 14), generator=generator) * 0.5 + 0.25
    background = background.repeat_interleave(14, 1).repeat_interleave(14, 2)[:, :height, :width]
    video = background.expand(frames, 3, height, width).clone()
    for t in range(frames):
        y = (start[0] + t * step[0]) % max(1, height - square)
        x = (start[1] + t * step[1]) % max(1, width - square)
        video[t, :, y : y + square, x : x + square] = torch.tensor(color)[:, None, None]
    return video


# ------------------------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    """One conversation: `prefix` text, an optional video, `suffix` text, and an optional `answer` to learn.

    Token lists are ids; the video is `(frames, 3, height, width)`.
    """

    video: torch.Tensor | None = None
    prefix: list[int] = field(default_factory=lambda: [BOS, 11, 12])
    suffix: list[int] = field(default_factory=lambda: [21, 22, 23])
    answer: list[int] | None = None
    image: torch.Tensor | None = None  # `(3, height, width)`, placed before the video


def pad_rows(rows: list[list[int]], value: int, padding_side: str) -> torch.Tensor:
    """Pad token-id lists to one length on `padding_side`."""
    length = max(len(r) for r in rows)
    padded = []
    for row in rows:
        filler = [value] * (length - len(row))
        padded.append(filler + row if padding_side == "left" else row + filler)
    return torch.tensor(padded)


def tokenize(samples: list[Sample], placeholders, padding_side: str, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask / labels of `samples`, with `placeholders(sample)` the ids between prefix and
    suffix (a video's or image's placeholder run). Labels are -100 everywhere but on the answer."""
    rows, label_rows = [], []
    for sample in samples:
        ids = list(sample.prefix) + list(placeholders(sample)) + list(sample.suffix)
        labels = [-100] * len(ids)
        if sample.answer is not None:
            ids += list(sample.answer)
            labels += list(sample.answer)
        rows.append(ids)
        label_rows.append(labels)
    batch = {
        "input_ids": pad_rows(rows, pad_id, padding_side),
        "attention_mask": pad_rows([[1] * len(r) for r in rows], 0, padding_side),
    }
    if any(s.answer is not None for s in samples):
        batch["labels"] = pad_rows(label_rows, -100, padding_side)
    return batch


def tokenize_stacked_videos(
    config: Any, samples: list[Sample], padding_side: str, image_tokens: int, video_tokens_per_frame: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Tokenise samples as the LLaVA-style processors write them: an image (first) as `image_tokens` image
    placeholders, a video as `video_tokens_per_frame` video placeholders per frame; the videos stacked into
    `pixel_values_videos` `(videos, frames, 3, size, size)` (so one frame count and size per batch).

    Returns:
        `(batch, images)`: the model's keyword arguments but the images', and the samples' images (the families lay
        those out differently).
    """

    def placeholders(sample: Sample) -> list[int]:
        ids = [] if sample.image is None else [config.image_token_id] * image_tokens
        if sample.video is not None:
            ids += [config.video_token_id] * (sample.video.shape[0] * video_tokens_per_frame)
        return ids

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    videos = [s.video for s in samples if s.video is not None]
    if videos:
        batch["pixel_values_videos"] = torch.stack(videos)
    return batch, [s.image for s in samples if s.image is not None]


# ------------------------------------------------------------------------------------------------ conformance
@dataclass(frozen=True)
class FamilyCase:
    """What the conformance suite (tests/test_conformance.py) needs to run one registry entry.

    Args:
        name (`str`): the registry entry.
        model_class (`type`): the transformers model class.
        make_config (`Callable[[], PretrainedConfig]`): a tiny config.
        build_batch (`Callable[[config, list[Sample], str], dict]`): processor-faithful batch of samples.
        videos (`tuple[tuple[int, int, int], ...]`): (frames, height, width) of the two videos of the batch tests,
            as different as the family allows.
        units (`Callable[[config, int, int, int], tuple[int, int]]`): the method's frames and units per frame the
            processor makes of a (frames, height, width) video, computed independently of the entry.
        vit_tokens_per_unit (`int`): ViT tokens of one unit.
        one_frame (`int`): frames of the smallest video (Qwen: 2 frames fill one temporal slot).
        packs_rows (`bool`): the ViT runs frames as a batch (row packing) rather than one packed sequence.
        prune_layer (`int`): prune layer of the tests (the tiny ViTs are 4-5 blocks deep).
        make_processor (`Callable[[config], ProcessorMixin]`, *optional*): the family's real transformers processor
            class for the tiny config, with a tiny tokenizer built offline (`stts_adapter.testing.processors`).
        video_prompt (`str`): what a prompt writes for a video, for the processor.
        processor_videos (`tuple[tuple[int, int, int], ...]`, *optional*): (frames, height, width) of the videos fed
            to the processor, if not `videos` (e.g. one frame count for processors that stack videos).
    """

    name: str
    model_class: type
    make_config: Any
    build_batch: Any
    videos: tuple[tuple[int, int, int], ...]
    units: Any
    vit_tokens_per_unit: int
    one_frame: int = 1
    packs_rows: bool = True
    prune_layer: int = 1
    make_processor: Any = None
    video_prompt: str = "<video>"
    processor_videos: tuple[tuple[int, int, int], ...] | None = None

    def video(self, index: int, seed: int = 0, size: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Video `index` of the batch tests (a moving square), different per index and seed; `size` (frames,
        height, width) defaults to `videos[index]`."""
        frames, height, width = size or self.videos[index]
        colors = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.2), (0.2, 0.3, 1.0)]
        return moving_square_video(
            frames, height, width, square=min(14, height // 2), color=colors[index % 3], step=(0, 7), seed=seed + index
        )

    def processor_video(self, index: int) -> Any:
        """Video `index` as a decoded file gives it to a processor: a uint8 numpy array `(frames, height, width, 3)`."""
        size = (self.processor_videos or self.videos)[index]
        return (self.video(index, size=size) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def processor_video_file(self, index: int, path: Any, fps: int = 4) -> str:
        """Video `index` written as an H.264 mp4 file at `path` (PyAV), as a user's video file would be."""
        write_video_file(path, self.processor_video(index), fps)
        return str(path)

    def __repr__(self) -> str:  # readable pytest ids
        return self.name
