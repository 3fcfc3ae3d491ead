"""The model and its training: `TrainSettings`, the model config, the training loop, the shared inits (pretrained
unpruned, cached by their settings) and a row's model built from its init."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import statistics
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
import transformers
from safetensors.torch import load_model, save_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from benchmarks.video_qa.data import TASKS, Clip, VideoSettings, clip_stream
from benchmarks.video_qa.rows import ROWS, Row, build_batch
from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import special_tokens, tiny_qwen2_5_vl_config, tiny_text_config
from stts_adapter.training import scorer_grad_norm, stts_parameter_groups


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
        """Means of the first and last tenth of every curve (`first_and_last`)."""
        return {k: v for name in asdict(self) for k, v in first_and_last(name, getattr(self, name)).items()}


def first_and_last(name: str, values: list[float]) -> dict[str, float]:
    """Means of the first and the last tenth of a training curve (nothing for an empty one)."""
    if not values:
        return {}
    window = max(1, len(values) // 10)
    return {f"{name}_first": statistics.mean(values[:window]), f"{name}_last": statistics.mean(values[-window:])}


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
            if any(p.requires_grad for p in model.scorer.parameters()):  # not while frozen (two-phase rows)
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


def pretrain_steps_of(init: str, train: TrainSettings) -> int:
    """Training steps of the init called `init`."""
    return train.distractor_pretrain_steps if init == "distractor" else train.pretrain_steps


def init_key(init: str, train: TrainSettings) -> str:
    """What an init depends on, as a short hash: its videos (their settings, and the first clips the generator makes
    of them, so that a change of the generator's code retrains it), its training settings, the model's config and
    the library versions."""
    settings = {
        "video": asdict(TASKS[init]),
        "clips": clips_fingerprint(clip_stream("pretrain", 0, TASKS[init]), train.batch_size),
        "steps": pretrain_steps_of(init, train),
        "lr": train.pretrain_lr,
        "batch_size": train.batch_size,
        "warmup": train.warmup,
        "weight_decay": train.weight_decay,
        "model": model_config().to_dict(),
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,  # its weight-init code draws the random start
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def clips_fingerprint(stream: Iterator[Clip], count: int) -> str:
    """sha256 of the next `count` clips of `stream`: their pixels, questions and answers."""
    digest = hashlib.sha256()
    for _ in range(count):
        clip = next(stream)
        digest.update(clip.video.numpy().tobytes())
        digest.update(f"{clip.question}/{clip.answer}".encode())
    return digest.hexdigest()


def init_path(init: str, train: TrainSettings, cache: str) -> str:
    """Where the init called `init` is cached under `cache` (its name holds its key)."""
    return os.path.join(cache, f"init-{init}-{init_key(init, train)}.safetensors")


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (an init's fingerprint in the report: runs from different inits never mix)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def pretrain_all(inits: list[str], train: TrainSettings, cache: str, workers: int) -> dict[str, str]:
    """The cached path of every init, pretraining the missing ones (in parallel when `workers` > 1)."""
    if workers == 1 or len(inits) == 1:
        return {init: pretrain(init, train, cache) for init in inits}
    with ProcessPoolExecutor(min(workers, len(inits)), mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = pool.map(pretrain_in_worker, inits, [train] * len(inits), [cache] * len(inits))
        return dict(zip(inits, paths))


def pretrain_in_worker(init: str, train: TrainSettings, cache: str) -> str:
    """`pretrain` in a worker process, on one thread."""
    torch.set_num_threads(1)
    return pretrain(init, train, cache)


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
