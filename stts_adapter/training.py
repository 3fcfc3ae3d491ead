"""Training STTS with the tools people already use: `transformers.Trainer`, PEFT's LoRA, DDP and FSDP.

```python
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments
from stts_adapter import STTSConfig, apply_stts
from stts_adapter.training import STTSCallback, stts_parameter_groups

model = apply_stts(get_peft_model(vlm, LoraConfig(target_modules="all-linear")), STTSConfig())  # LoRA first
optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=2e-4, scorer_lr=1e-3))
trainer = Trainer(model, args, train_dataset=..., data_collator=..., optimizers=(optimizer, None),
                  callbacks=[STTSCallback()])
trainer.train()
model.base_model.save_pretrained("out/lora", is_main_process=trainer.is_world_process_zero())  # LoRA only
model.save_pretrained("out/stts", is_main_process=trainer.is_world_process_zero())             # scorer only
```
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .io import save_adapter
from .model import STTSModel
from .report import SATURATED_LOGIT, STTSReport

SCORER_GROUP = "stts_scorer"
"""`name` of the optimizer parameter groups that hold the scorer (see `stts_parameter_groups`)."""

STTS_ADAPTER_SUBDIR = "stts_adapter"
"""Sub-folder of a Trainer checkpoint where `STTSCallback` writes the STTS adapter."""

LORA_ADAPTER_SUBDIR = "peft_adapter"
"""Sub-folder of a Trainer checkpoint where `STTSCallback` writes the PEFT (e.g. LoRA) adapter of the base model."""

logger = logging.get_logger(__name__)

_WRAPPER_ATTRIBUTES = ("module", "_orig_mod")  # DDP / FSDP1 / DataParallel, torch.compile
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")  # the Trainer's patterns


def find_stts_model(model: nn.Module) -> STTSModel:
    """The `STTSModel` inside `model`: the model itself, or what DDP, FSDP (v1), DataParallel or `torch.compile`
    wrapped around it.

    Args:
        model (`nn.Module`): an `STTSModel`, possibly wrapped.

    Returns:
        `STTSModel`

    Raises:
        `TypeError`: no `STTSModel` inside.
    """
    given = model
    while not isinstance(model, STTSModel):
        inner = next(
            (getattr(model, a) for a in _WRAPPER_ATTRIBUTES if isinstance(getattr(model, a, None), nn.Module)), None
        )
        if inner is None:
            raise TypeError(
                f"{type(given).__name__} is not an STTS model: wrap the VLM with apply_stts(model, STTSConfig(...)) "
                "(after get_peft_model, if you train LoRA too) before handing it to the Trainer."
            )
        model = inner
    return model


# ------------------------------------------------------------------------------------------- optimizer groups
def stts_parameter_groups(
    model: nn.Module,
    scorer_lr: float,
    lr: float | None = None,
    weight_decay: float = 0.0,
    scorer_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups that give the STTS scorer its own learning rate (and weight decay).

    Only trainable parameters are included. The scorer's groups are named `"stts_scorer"` and come last, so that a
    `Trainer` logs the learning rate of the other parameters (LoRA, or the base model) as `learning_rate`;
    `STTSCallback` logs the scorer's as `stts_scorer_lr`. Learning-rate schedulers scale every group by the same
    factor, so the ratio between the two learning rates holds for the whole run. As in `Trainer`, biases and
    normalisation weights get no weight decay.

    Args:
        model (`nn.Module`): an `STTSModel`, or DDP / FSDP (with `use_orig_params=True`) / `torch.compile` around one.
        scorer_lr (`float`): the scorer's learning rate.
        lr (`float`, *optional*): learning rate of the other trainable parameters; `None` leaves them at the
            optimizer's default `lr`.
        weight_decay (`float`, *optional*, defaults to 0.0): weight decay of the other parameters.
        scorer_weight_decay (`float`, *optional*): the scorer's weight decay (`None`: `weight_decay`).

    Returns:
        `list[dict]`: `[{"params": [...], "lr": ..., "weight_decay": ..., "name": ...}, ...]` for any
        `torch.optim.Optimizer`. Groups without parameters are left out.

    Example:

    ```python
    optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=2e-4, scorer_lr=1e-3, weight_decay=0.01))
    trainer = Trainer(model, args, ..., optimizers=(optimizer, None))  # the Trainer still builds the scheduler
    ```
    """
    scorer = find_stts_model(model).scorer
    scorer_parameters = {id(p) for p in scorer.parameters()} if scorer is not None else set()
    if scorer is not None and not scorer_parameters:
        raise ValueError(
            "The STTS scorer holds no parameters of its own in this model: FSDP flattened them into a parameter "
            "shared with other modules. Wrap the scorer as its own FSDP unit (auto-wrap policy on STTSScorer) or use "
            "use_orig_params=True, then build the groups from the wrapped model."
        )
    scorer_weight_decay = weight_decay if scorer_weight_decay is None else scorer_weight_decay
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(s, d): [] for s in (False, True) for d in (True, False)}
    for parameter, decays in _trainable_with_decay(model):
        buckets[(id(parameter) in scorer_parameters, decays)].append(parameter)
    groups = []
    for (is_scorer, decays), parameters in buckets.items():
        if not parameters:
            continue
        group: dict[str, Any] = {"params": parameters, "name": SCORER_GROUP if is_scorer else "base"}
        if is_scorer:
            group["lr"] = scorer_lr
        elif lr is not None:
            group["lr"] = lr
        group["weight_decay"] = (scorer_weight_decay if is_scorer else weight_decay) if decays else 0.0
        groups.append(group)
    return groups


def stts_optimizer_cls_and_kwargs(
    lr: float,
    scorer_lr: float,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    weight_decay: float = 0.0,
    scorer_weight_decay: float | None = None,
    **optimizer_kwargs: Any,
) -> tuple[type, dict[str, Any]]:
    """`Trainer(optimizer_cls_and_kwargs=...)` that builds the optimizer from `stts_parameter_groups`.

    Use it where the Trainer must create the optimizer itself, from the model it has wrapped: with FSDP (and
    DeepSpeed) the Trainer refuses `optimizers=(optimizer, None)`.

    Args:
        lr (`float`): learning rate of the other trainable parameters (usually `args.learning_rate`).
        scorer_lr (`float`): the scorer's learning rate.
        optimizer_cls (`type`, *optional*, defaults to `torch.optim.AdamW`): the optimizer class.
        weight_decay, scorer_weight_decay (`float`, *optional*): as in `stts_parameter_groups`.
        **optimizer_kwargs: other arguments of `optimizer_cls` (e.g. `betas`).

    Returns:
        `(factory, kwargs)`: the Trainer calls `factory()(model, **kwargs)` when it creates the optimizer.

    Example:

    ```python
    optimizer = stts_optimizer_cls_and_kwargs(lr=args.learning_rate, scorer_lr=1e-3)
    trainer = Trainer(model, args, ..., optimizer_cls_and_kwargs=optimizer)
    ```
    """
    settings = dict(lr=lr, scorer_lr=scorer_lr, weight_decay=weight_decay, scorer_weight_decay=scorer_weight_decay)
    return _STTSOptimizerFactory, {"optimizer_cls": optimizer_cls, "settings": settings, **optimizer_kwargs}


class _STTSOptimizerFactory:
    """What `Trainer.create_optimizer` calls for `stts_optimizer_cls_and_kwargs` (an optimizer factory)."""

    def __call__(self, model: nn.Module, optimizer_cls: type, settings: dict[str, Any], **kwargs: Any) -> Any:
        return optimizer_cls(stts_parameter_groups(model, **settings), lr=settings["lr"], **kwargs)


def _trainable_with_decay(model: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """Every trainable parameter once, with whether it gets weight decay: the Trainer's rule (not in a LayerNorm, no
    bias or norm in its name), decided per module so that any wrapper's naming works (FSDP flattens shapes)."""
    seen: set[int] = set()
    result = []
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            full_name = f"{module_name}.{name}" if module_name else name
            decays = not isinstance(module, nn.LayerNorm) and not _NO_DECAY.search(full_name.lower())
            result.append((parameter, decays))
    return result


def scorer_grad_norm(model: nn.Module) -> float | None:
    """The L2 norm of the STTS scorer's current gradient (what `backward` accumulated in its `.grad`).

    Call it between `loss.backward()` and `optimizer.zero_grad()` to see whether the losses still reach the scorer:
    a norm that falls to ~0 while the loss does not means the scorer has stopped learning (saturated scores).

    Args:
        model (`nn.Module`): an `STTSModel`, possibly wrapped (DDP, FSDP, `torch.compile`). With FSDP2 every process
            must call it (the sharded gradients are gathered).

    Returns:
        `float`, or None when the model has no learned scorer or the scorer has no gradient yet.
    """
    scorer = find_stts_model(model).scorer
    grads = [p.grad for p in scorer.parameters() if p.grad is not None] if scorer is not None else []
    if not grads:
        return None
    squares = [(g.full_tensor() if hasattr(g, "full_tensor") else g).double().square().sum() for g in grads]
    return float(torch.stack(squares).sum().sqrt())


# ------------------------------------------------------------------------------------------- Trainer callback
class _ReportStats:
    """Running sums of the reports of one phase (training or evaluation) between two logging events, kept as tensors
    on the model's device so that no call synchronises it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.units = [0, 0, 0]  # videos, units before, units after
        self.aux: list[torch.Tensor] = []
        self.lm: list[torch.Tensor] = []
        self.score_moments: list[torch.Tensor] = []  # (sum, sum of squares, count) per call
        self.score_extremes: list[torch.Tensor] = []  # (min, -max) per call
        self.saturation: list[torch.Tensor] = []  # (saturated scores, scores) per call with a learned scorer
        self.grad_norms: list[float] = []  # the scorer's gradient norm at every optimizer step

    def add(self, report: STTSReport) -> None:
        self.calls += 1
        self.units[0] += len(report.units_before)
        self.units[1] += sum(report.units_before)
        self.units[2] += sum(report.units_after)
        if report.aux_loss is not None:
            self.aux.append(report.aux_loss.detach().double().reshape(()))
        if report.lm_loss is not None:
            self.lm.append(report.lm_loss.detach().double().reshape(()))
        scores = torch.cat([s.detach().double().flatten() for s in report.scores]) if report.scores else None
        if scores is not None and scores.numel():
            count = torch.tensor(float(scores.numel()), dtype=torch.float64, device=scores.device)
            self.score_moments.append(torch.stack([scores.sum(), scores.square().sum(), count]))
            self.score_extremes.append(torch.stack([scores.min(), -scores.max()]))
        if report.logits:
            logits = torch.cat([x.detach().double().flatten() for x in report.logits])
            saturated = (logits.abs() > SATURATED_LOGIT).sum().double()
            self.saturation.append(torch.stack([saturated, torch.tensor(float(logits.numel()), device=logits.device)]))

    def summary(self, device: torch.device | str, distributed: bool) -> dict[str, float]:
        """The statistics since the last reset, averaged over every process when `distributed` (a collective call:
        every rank must make it)."""

        def total(values: list[torch.Tensor], size: int) -> torch.Tensor:
            if not values:
                return torch.zeros(size, dtype=torch.float64, device=device)
            return torch.stack([v.to(device) for v in values]).reshape(len(values), size).sum(0)

        sums = torch.cat(
            [
                torch.tensor(
                    [self.calls, *self.units, len(self.aux), len(self.lm)], dtype=torch.float64, device=device
                ),
                total(self.aux, 1),
                total(self.lm, 1),
                total(self.score_moments, 3),
                total(self.saturation, 2),
                torch.tensor([sum(self.grad_norms), len(self.grad_norms)], dtype=torch.float64, device=device),
            ]
        )
        extremes = torch.full((2,), math.inf, dtype=torch.float64, device=device)
        if self.score_extremes:
            extremes = torch.stack([e.to(device) for e in self.score_extremes]).min(0).values
        if distributed:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MIN)
        calls, videos, before, after, aux_n, lm_n, aux, lm, s_sum, s_sq, s_n, sat, sat_n, g_sum, g_n = sums.tolist()
        metrics: dict[str, float] = {}
        if g_n:
            metrics["scorer_grad_norm"] = g_sum / g_n
        if calls == 0 or videos == 0:
            return metrics
        metrics["kept_fraction"] = after / max(before, 1.0)
        metrics["video_tokens_before"] = before / videos
        metrics["video_tokens_after"] = after / videos
        if aux_n:
            metrics["aux_loss"] = aux / aux_n
        if lm_n:
            metrics["lm_loss"] = lm / lm_n
        if s_n:
            mean = s_sum / s_n
            metrics["score_mean"] = mean
            metrics["score_std"] = math.sqrt(max(s_sq / s_n - mean * mean, 0.0))
            metrics["score_min"] = extremes[0].item()
            metrics["score_max"] = -extremes[1].item()
        if sat_n:
            metrics["saturated_fraction"] = sat / sat_n
        return metrics


class STTSCallback(TrainerCallback):
    """A `transformers.Trainer` callback that adds STTS's numbers to the Trainer's logs, and (optionally) writes the
    adapters into every checkpoint.

    At each logging step it adds, averaged over the training calls since the previous log and over all processes:

    - `stts_aux_loss`: the temporal auxiliary loss (the Trainer's `loss` already includes `aux_loss_weight` x it);
    - `stts_lm_loss`: the language-model loss alone;
    - `stts_kept_fraction`: kept video units over all video units;
    - `stts_video_tokens_before` / `stts_video_tokens_after`: video tokens (units) per video, before and after;
    - `stts_score_mean`, `stts_score_std`, `stts_score_min`, `stts_score_max`: statistics of the scorer's scores;
    - `stts_saturated_fraction`: the fraction of scores within 1e-4 of 0 or 1, where the sigmoid passes almost no
      gradient (a healthy run keeps it near 0; see `STTSReport.saturated_fraction`);
    - `stts_scorer_grad_norm`: the L2 norm of the scorer's gradient at each optimizer step (after the Trainer's
      gradient clipping, as the optimizer sees it), averaged over the steps since the previous log;
    - `stts_scorer_lr`: the scorer's learning rate, when the optimizer was built with `stts_parameter_groups`.

    Evaluation logs get the same numbers for the evaluation calls, under the evaluation prefix (`eval_stts_...`),
    except the aux loss, which the model does not compute in eval mode.
    The numbers come from the model's `STTSReport` of every call (`STTSModel.register_report_hook`); the callback
    never reads the model's outputs.

    The values are added to the `logs` of `on_log` and to the `state.log_history` entry the Trainer just appended,
    so the progress bar, the printed logs and `log_history` show them. Reporting integrations (`report_to`) run their
    `on_log` before the callbacks passed to the Trainer; to have them record the STTS numbers too, put the callback
    first with `add_stts_callback(trainer)`.

    In distributed runs every process must log at the same steps (as the Trainer does): the statistics are reduced
    across processes with `torch.distributed.all_reduce`.

    Args:
        save_adapters (`bool`, *optional*, defaults to `True`): on each checkpoint save, the main process writes the
            STTS adapter to `checkpoint-N/stts_adapter/` and, when the base model is a `PeftModel`, the PEFT adapter to
            `checkpoint-N/peft_adapter/`. The Trainer's own checkpoint files (which it needs to resume) are unchanged.
        prefix (`str`, *optional*, defaults to `"stts_"`): prefix of the logged keys.
        scorer_first_steps (`int`, *optional*, defaults to 0): a two-phase schedule (ours) when > 0: for the first
            `scorer_first_steps` optimizer steps only the scorer trains (the base model frozen), then only the base
            model's trainable parameters (the scorer frozen), with `STTSModel.set_trainable`. It needs a trainable
            base (`train_base_model=True` or a PeftModel). On the project's benchmark this is what keeps a learned
            scorer's gain once the base trains: trained together, the scorer un-learns what it learned (README).
            A resumed run picks the phase of its checkpoint's step. Not under FSDP.
    """

    def __init__(self, save_adapters: bool = True, prefix: str = "stts_", scorer_first_steps: int = 0) -> None:
        if not (isinstance(scorer_first_steps, int) and scorer_first_steps >= 0):
            raise ValueError(f"scorer_first_steps must be an integer >= 0, got {scorer_first_steps!r}.")
        self.save_adapters = save_adapters
        self.prefix = prefix
        self.scorer_first_steps = scorer_first_steps
        self._model: STTSModel | None = None
        self._handle = None
        self._train = _ReportStats()
        self._eval = _ReportStats()
        self._warned_sharded = False

    # ------------------------------------------------------------------------------------------ hook
    def attach(self, model: nn.Module) -> None:
        """Listen to the pruning reports of `model` (an `STTSModel`, possibly wrapped). The Trainer's `on_init_end`
        and `on_train_begin` events do it."""
        stts_model = find_stts_model(model)
        if stts_model is self._model and self._handle is not None:
            return
        self.detach()
        self._model = stts_model
        self._handle = stts_model.register_report_hook(self._on_report)

    def detach(self) -> None:
        """Stop listening to the model's reports."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._model = None

    def _on_report(self, report: STTSReport) -> None:
        (self._train if self._model is not None and self._model.training else self._eval).add(report)

    # ------------------------------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.attach(model)  # added after the Trainer was built (add_stts_callback, trainer.add_callback)
        self._train.reset()
        if self.scorer_first_steps and self._model is not None:
            if _is_sharded(model if model is not None else self._model):
                raise ValueError(
                    "STTSCallback(scorer_first_steps=...) switches requires_grad between phases, which FSDP does not "
                    "allow after wrapping. Run the two phases as two trainings instead (train_base_model=False, "
                    "then set_trainable(scorer=False, base=True) before wrapping again)."
                )
            self._set_phase(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.scorer_first_steps and state.global_step == self.scorer_first_steps:
            self._set_phase(state.global_step)

    def _set_phase(self, step: int) -> None:
        """The scorer alone before `scorer_first_steps`, the base alone from then on."""
        scorer_phase = step < self.scorer_first_steps
        self._model.set_trainable(scorer=scorer_phase, base=not scorer_phase)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._model is not None:
            norm = scorer_grad_norm(self._model)
            if norm is not None:
                self._train.grad_norms.append(norm)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None:
            return
        phase = _log_phase(logs)
        if phase is None:
            return
        stats, key_prefix = (self._train, "") if phase == "" else (self._eval, phase)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        distributed = distributed and torch.distributed.get_world_size() > 1
        added = {f"{key_prefix}{self.prefix}{k}": v for k, v in stats.summary(args.device, distributed).items()}
        stats.reset()
        if phase == "" and optimizer is not None:
            scorer_lr = _scorer_learning_rate(optimizer, logs.get("learning_rate"))
            if scorer_lr is not None:
                added[f"{self.prefix}scorer_lr"] = scorer_lr
        if not added:
            return
        last = state.log_history[-1] if state.log_history else None
        if (
            last is not None
            and last.get("step") == state.global_step
            and all(last.get(k) == v for k, v in logs.items())
        ):
            last.update(added)  # the entry the Trainer appended for these logs, just before calling on_log
        logs.update(added)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_adapters or model is None:
            return
        stts_model = find_stts_model(model)
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # Every process calls it (gathering a sharded scorer is a collective); only the main one writes.
        has_peft_adapter = stts_model.base_model is not stts_model.transformers_model
        save_adapter(
            stts_model,
            os.path.join(checkpoint, STTS_ADAPTER_SUBDIR),
            is_main_process=state.is_world_process_zero,
            training=_training_details(args, state, LORA_ADAPTER_SUBDIR if has_peft_adapter else None),
        )
        if has_peft_adapter and _is_sharded(model):
            if not self._warned_sharded:
                logger.warning(
                    "STTSCallback does not write the PEFT adapter of an FSDP-sharded model into checkpoints; save it "
                    "with your FSDP state-dict tools (the STTS adapter is written)."
                )
                self._warned_sharded = True
        elif has_peft_adapter and state.is_world_process_zero:
            stts_model.base_model.save_pretrained(os.path.join(checkpoint, LORA_ADAPTER_SUBDIR))  # the PeftModel's


def _training_details(args: Any, state: Any, peft_adapter: str | None) -> dict[str, float | int | str]:
    """What the model card of a Trainer checkpoint says about its training: steps, batch size, learning rates and
    the last logged STTS numbers (kept fraction, scorer learning rate), and where the PEFT adapter is. Whatever the
    arguments or the state do not hold is left out."""
    fields = {
        "steps": getattr(state, "global_step", None),
        "per-device batch size": getattr(args, "per_device_train_batch_size", None),
        "learning rate (peak)": getattr(args, "learning_rate", None),
    }
    details: dict[str, float | int | str] = {k: v for k, v in fields.items() if v is not None}
    logged = [log for log in getattr(state, "log_history", None) or [] if "stts_kept_fraction" in log and "loss" in log]
    if logged:
        last = logged[-1]
        details["kept fraction (last logged)"] = round(last["stts_kept_fraction"], 4)
        if "stts_scorer_lr" in last:
            details["scorer learning rate (last logged)"] = last["stts_scorer_lr"]
    if peft_adapter is not None:
        details["PEFT adapter"] = f"../{peft_adapter}"
    return details


def _is_sharded(model: nn.Module) -> bool:
    """FSDP (v1 wrapper, or v2 DTensor parameters) somewhere in `model`."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _scorer_learning_rate(optimizer: Any, logged_lr: float | None) -> float | None:
    """The scorer's learning rate at the step the Trainer's `learning_rate` (the first group's) describes.

    Schedulers scale every group by the same factor, so the scorer's is the logged one times the ratio of the two
    groups' initial learning rates.
    """
    groups = getattr(optimizer, "param_groups", [])
    scorer = next((g for g in groups if g.get("name") == SCORER_GROUP), None)
    if scorer is None:
        return None
    if logged_lr is None:
        return scorer["lr"]
    first = groups[0]
    first_lr, scorer_lr = first.get("initial_lr", first["lr"]), scorer.get("initial_lr", scorer["lr"])
    return logged_lr * scorer_lr / first_lr if first_lr else scorer["lr"]


def _log_phase(logs: dict[str, Any]) -> str | None:
    """The metric prefix of a log: empty for a training log, e.g. "eval_" for an evaluation log, None for the rest."""
    if "loss" in logs:
        return ""
    for key in logs:
        if key.endswith("_runtime") and not key.startswith("train_"):
            return key[: -len("runtime")]
    return None


def add_stts_callback(trainer: Any, callback: STTSCallback | None = None) -> STTSCallback:
    """Put an `STTSCallback` first among `trainer`'s callbacks, so that reporting integrations (`report_to`:
    TensorBoard, W&B, ...) see the STTS numbers in the logs too.

    Args:
        trainer (`transformers.Trainer`): the trainer.
        callback (`STTSCallback`, *optional*): the callback to add (default: `STTSCallback()`).

    Returns:
        `STTSCallback`: the callback added.
    """
    callback = callback if callback is not None else STTSCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
