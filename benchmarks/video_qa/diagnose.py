"""What a fine-tuned scorer does, by kind of unit (the answer's, an object's, a screen's, a static one's): where its
logits sit, what it keeps, whether the answer tops its frame, and how strongly each loss term pulls on the logits.

    python -m benchmarks.video_qa.diagnose distractor-stts-50-upper frozen 0 --set logit_penalty_weight=0.001

The tables' accuracies tell what a row reaches; this tells why (a number can look right, or wrong, for a reason
nobody looked at). It trains the row like a benchmark job, then runs one training-mode forward on evaluation clips
and takes the gradient of each loss term with respect to the scorer's logits.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from benchmarks.common import argument_parser
from benchmarks.video_qa.data import INIT_OF_TASK, KINDS, TASKS, Clip, clip_set, unit_kinds
from benchmarks.video_qa.jobs import Job, fine_tune
from benchmarks.video_qa.main import CACHE
from benchmarks.video_qa.rows import ROWS, Row, build_batch
from benchmarks.video_qa.train import TrainSettings, pretrain


@dataclass
class Probe:
    """One training-mode forward of a scorer, on a batch of clips (every tensor `(clips, slots, units)`).

    Attributes:
        logits: the scorer's logits (a training-free rule's scores, which it ranks the same way).
        kept: the units selection kept.
        pulls: per loss term ("lm", "aux", "penalty", each with its weight in the loss), -d(term)/d(logit): how
            hard, and which way, the term moves each logit.
    """

    logits: torch.Tensor
    kept: torch.Tensor
    pulls: dict[str, torch.Tensor]


def probe(model: torch.nn.Module, clips: Sequence[Clip], row: Row) -> Probe:
    """Run `clips` through `model` in training mode and take each loss term's gradient on the scorer's logits (a
    training-free rule: an eval-mode forward, as `evaluate` runs it, and no pulls)."""
    if model.scorer is None:
        with torch.no_grad():
            report = forward_in_mode(model, clips, row, training=False)
        return Probe(torch.stack(report.scores), torch.stack(report.keep_masks), {})
    captured = []

    def keep_logits(module: torch.nn.Module, args: Any, kwargs: Any, output: torch.Tensor) -> None:
        if output.numel():  # not the empty call that ties the scorer to the graph
            captured.append(output)

    handle = model.scorer.register_forward_hook(keep_logits, with_kwargs=True)
    try:
        report = forward_in_mode(model, clips, row, training=True)
    finally:
        handle.remove()
    (logits,) = captured
    config = model.stts_config
    terms = {
        "lm": (1.0, report.lm_loss),
        "aux": (config.aux_loss_weight, report.aux_loss),
        "penalty": (config.logit_penalty_weight, report.logit_penalty),
    }
    pulls = {}
    for name, (weight, term) in terms.items():
        if weight and term is not None and term.requires_grad:
            term = weight * term
            (gradient,) = torch.autograd.grad(term, logits, retain_graph=True, allow_unused=True)
            if gradient is not None:
                pulls[name] = -gradient.detach().view(len(clips), *report.logits[0].shape)
    return Probe(logits.detach().view(len(clips), *report.logits[0].shape), torch.stack(report.keep_masks), pulls)


def forward_in_mode(model: torch.nn.Module, clips: Sequence[Clip], row: Row, training: bool) -> Any:
    """`out.stts` of one forward of `clips` in the given mode; the model keeps the mode it had."""
    was_training = model.training
    try:
        model.train(training)
        return model(**build_batch(model.config, clips, row)).stts
    finally:
        model.train(was_training)


def summarise(result: Probe, kinds: torch.Tensor) -> list[dict[str, Any]]:
    """Per kind of unit: how many, logit quantiles (10 / 50 / 90%), % kept, % at the top of their frame, the median
    gap to their frame's highest logit, and each term's mean pull and mean absolute pull."""
    frame_max = result.logits.amax(dim=-1, keepdim=True).expand_as(result.logits)
    rows = []
    for index, kind in enumerate(KINDS):
        where = kinds == index
        if not where.any():
            continue
        logits = result.logits[where]
        rows.append(
            {
                "kind": kind,
                "units": int(where.sum()),
                "logit": [round(float(q), 2) for q in logits.quantile(torch.tensor([0.1, 0.5, 0.9]))],
                "kept": 100 * float(result.kept[where].float().mean()),
                "top_of_frame": 100 * float((logits == frame_max[where]).float().mean()),
                "below_frame_max": float((frame_max[where] - logits).median()),
                "pull": {name: float(pull[where].mean()) for name, pull in result.pulls.items()},
                "abs_pull": {name: float(pull[where].abs().mean()) for name, pull in result.pulls.items()},
            }
        )
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table."""
    terms = sorted({name for row in rows for name in row["pull"]})
    header = ["kind", "units", "logit q10 / q50 / q90", "kept %", "top of frame %", "below frame max (median)"]
    header += [f"{name} pull (mean, mean abs)" for name in terms]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["kind"], str(row["units"]), " / ".join(f"{q:g}" for q in row["logit"])]
        cells += [f"{row['kept']:.1f}", f"{row['top_of_frame']:.1f}", f"{row['below_frame_max']:.3g}"]
        cells += [f"{row['pull'][name]:+.1e}, {row['abs_pull'][name]:.1e}" for name in terms]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_option(text: str) -> tuple[str, Any]:
    """`field=value` (the value as JSON when it parses, else as a string) -> `(field, value)`."""
    field, _, value = text.partition("=")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Fine-tune one row as the benchmark does, then print (and return) its per-kind summary."""
    parser = argument_parser(__doc__, prog="python -m benchmarks.video_qa.diagnose")
    parser.add_argument("row", choices=[name for name, row in ROWS.items() if row.prunes])
    parser.add_argument("regime", choices=("frozen", "trained"))
    parser.add_argument("seed", type=int)
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        type=parse_option,
        help="field=value: an STTSConfig option on top of the row's (repeatable)",
    )
    parser.add_argument("--split", choices=("val", "test"), default="val", help="the clips probed")
    parser.add_argument("--clips", type=int, default=32, help="clips probed, in one batch")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the benchmark's)")
    parser.add_argument("--cache", default=CACHE, help="folder of the cached inits")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1, as the benchmark's workers run, reproduces their runs exactly (another thread count "
        "sums in another order, and a run whose order comes from the growth of the logits' scale can end elsewhere)",
    )
    args = parser.parse_args(argv)
    train = TrainSettings() if args.steps is None else replace(TrainSettings(), steps=args.steps)
    row = replace(ROWS[args.row], options=ROWS[args.row].options + tuple(args.options))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        job = Job(args.row, args.regime, args.seed, pretrain(INIT_OF_TASK[row.task], train, args.cache))
        model, curves = fine_tune(job, train, row)
        clips = clip_set(args.split, args.clips, TASKS[row.task])
        rows = summarise(probe(model, clips, row), torch.stack([unit_kinds(clip) for clip in clips]))
    finally:
        torch.set_num_threads(threads)
    print(f"{args.row} {args.regime} seed {args.seed}, options {dict(row.options)}, {args.split} split:")
    if curves.loss:
        print(f"loss {statistics.mean(curves.loss[:10]):.3f} -> {statistics.mean(curves.loss[-10:]):.3f}")
    print(render(rows))
    return rows


if __name__ == "__main__":
    main()
