"""Evaluation: a model's answers on held-out clips, its accuracy, the video tokens it saw and the recall of the
answer's changing units."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.video_qa.data import KINDS, QUESTION_TYPES, Clip, candidate_tokens, unit_kinds
from benchmarks.video_qa.rows import Row, build_batch, kept_slots
from benchmarks.video_qa.train import TrainSettings


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
    """Accuracy (overall and per question type), video tokens per clip, recall of the answer's changing units, and
    the % of each kind of unit (`KINDS`) kept (recall is the answer's)."""
    model.eval()
    correct: dict[str, list[bool]] = {q: [] for q in QUESTION_TYPES}
    tokens = []
    kept_of_kind = torch.zeros(len(KINDS), dtype=torch.long)
    units_of_kind = torch.zeros(len(KINDS), dtype=torch.long)
    for start in range(0, len(clips), train.eval_batch_size):
        chunk = clips[start : start + train.eval_batch_size]
        predictions = predict(model, chunk, row)
        tokens += predictions.video_tokens
        for clip, answer, mask in zip(chunk, predictions.answers, predictions.keep_masks):
            correct[QUESTION_TYPES[clip.question]].append(answer == clip.answer)
            if mask is not None:
                kinds = unit_kinds(clip)  # -1 on the first slot, which is always kept
                kept_of_kind += torch.bincount(kinds[mask & (kinds >= 0)], minlength=len(KINDS))
                units_of_kind += torch.bincount(kinds[kinds >= 0], minlength=len(KINDS))
    every = [c for per_type in correct.values() for c in per_type]
    kept = None
    if units_of_kind.any():
        kept = {kind: 100 * int(k) / int(n) if n else None for kind, k, n in zip(KINDS, kept_of_kind, units_of_kind)}
    return {
        "accuracy": 100 * statistics.mean(every),
        "accuracy_per_type": {q: 100 * statistics.mean(c) for q, c in correct.items() if c},
        "video_tokens": statistics.mean(tokens),
        "recall": kept["answer"] if kept else None,  # the answer's units are the `changed` ones
        "kept_by_kind": kept,
    }
