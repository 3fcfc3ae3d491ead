"""`STTSModel`: a video VLM whose ViT and LLM only process the video tokens that matter."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput

from .config import STTSConfig
from .errors import STTSConfigError, STTSInputError
from .io import load_adapter, push_adapter_to_hub, save_adapter
from .layers import BaseLayerWrapper, STTSBlock, STTSConnector, STTSKeyBiasAttention, STTSMaskedAttention
from .llm_bias import active_llm_key_bias, attach_llm_key_bias, llm_decoder_layers, llm_key_bias
from .registry import ArchitectureEntry, VisionSpec, find_architecture, unwrap_peft
from .report import STTSReport
from .runtime import PruningSettings, VisionPruningPass
from .scorer import build_scorer
from .selection import VideoLayout
from .sequence import pad_token_id, plan_sequence_pruning

# Models whose STTS is switched off in the current context (thread / task) by `disable_stts`.
_DISABLED: ContextVar[frozenset[int]] = ContextVar("stts_disabled_models", default=frozenset())


class STTSModel(nn.Module):
    """A VLM wrapped with STTS token pruning. Create it with `apply_stts(model, config)` or
    `STTSModel.from_pretrained(model, adapter)`.

    It takes the base model's inputs (labels in the unpruned layout) and returns the base model's outputs computed
    on the pruned sequence, plus `out.stts` (an `STTSReport`). Unknown attributes are looked up on the base model,
    as with PEFT.

    Args:
        model (`nn.Module`): a supported transformers model, or a PeftModel around one. Wrapped in place.
        config (`STTSConfig`): the method's settings (copied; the copy records the base model).
    """

    def __init__(self, model: nn.Module, config: STTSConfig) -> None:
        super().__init__()
        if isinstance(model, STTSModel):
            raise TypeError("This model already has STTS applied; call .unload() first to apply a new config.")
        if not isinstance(config, STTSConfig):
            raise TypeError(f"config must be an STTSConfig, got {type(config).__name__}.")
        transformers_model = unwrap_peft(model)
        if any(isinstance(module, BaseLayerWrapper) for module in transformers_model.modules()):
            raise TypeError(
                "This model is still wrapped by another STTSModel (its ViT blocks are STTS wrappers). Call .unload() "
                "on that STTSModel first, or change its ratio with .set_prune_ratio()."
            )
        entry = find_architecture(transformers_model)
        spec = entry.vision_spec(transformers_model)
        _check_prune_layer(config, spec, entry.last_block(transformers_model))
        config = dataclasses.replace(
            config,
            architecture=entry.name,
            base_model_class=type(transformers_model).__name__,
            base_model_name_or_path=entry.model_name(transformers_model),
            vision_hidden_size=spec.hidden_size,
            num_vision_blocks=spec.num_blocks,
            patches_per_unit=spec.patches_per_unit,
        )
        scorer = build_scorer(config, spec)
        if scorer is not None:
            vision_device = entry.vision_device(transformers_model)
            vision_dtype = next(entry.get_vision_blocks(transformers_model).parameters()).dtype
            scorer.to(device=vision_device, dtype=torch.promote_types(vision_dtype, torch.float32))

        self.base_model = model
        self.scorer = scorer
        if scorer is not None:
            scorer.train(model.training)
        self.stts_config = config
        self._entry = entry
        self._requires_grad_before = [(p, p.requires_grad) for p in model.parameters()]
        self._report_hooks: OrderedDict[int, Callable[[STTSReport], None]] = OrderedDict()  # weakref-able
        self._warned_unmarked_videos = False
        self._mirror_forward_signature(model)
        llm_layers = _llm_key_bias_layers(transformers_model, entry, config)  # checked before anything changes
        self._injected = _inject_wrappers(transformers_model, entry, config.prune_layer)
        self._llm_bias_hooks = attach_llm_key_bias(llm_layers)
        if not (config.train_base_model or transformers_model is not model):  # a PeftModel keeps its own choice
            for parameter in model.parameters():
                parameter.requires_grad_(False)
        # What "the base trains" means for set_trainable: every base parameter with train_base_model, a PeftModel's
        # adapter weights, nothing otherwise.
        self._trainable_base_names = frozenset(name for name, p in model.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------------------------------------ helpers
    def _mirror_forward_signature(self, model: nn.Module) -> None:
        """Give this instance's `forward` the base model's signature: tools that read it (the Trainer keeps the
        dataset columns `forward` names) see the inputs the model takes, as with a PeftModel."""
        self.__dict__["forward"] = _ForwardWithBaseSignature(self)  # an instance attribute: nothing global changes

    @property
    def training(self) -> bool:
        """The base model's mode: `vlm.train()` / `vlm.eval()` on the wrapped model (as user code or a Trainer calls
        them) switch STTS too (its aux loss, its random masks)."""
        base_model = self.__dict__.get("_modules", {}).get("base_model")
        return self.__dict__.get("_training", True) if base_model is None else base_model.training

    @training.setter
    def training(self, mode: bool) -> None:
        base_model = self.__dict__.get("_modules", {}).get("base_model")
        if base_model is None:  # nn.Module.__init__, before the base model is attached
            self.__dict__["_training"] = mode
        else:
            base_model.training = mode

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _ADAPTER_API:  # forwarded, they would act on the base model's adapters, not on STTS
                raise AttributeError(
                    f"STTSModel has no {name}(): {_ADAPTER_API[name]} To use the base model's own adapter API (e.g. "
                    f"the LoRA adapters of a PeftModel under STTS), call model.get_base_model().{name}(...)."
                ) from None
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The model STTS wraps (a transformers model, a timm model, or a PeftModel of one), as PEFT's
        `get_base_model()`. The wrappers STTS put into it stay until `unload()`.

        Returns:
            `nn.Module`: `self.base_model`.
        """
        return self.base_model

    @property
    def peft_config(self) -> Any:
        """The PEFT configs of the PeftModel STTS was applied on (AttributeError when it wraps no PeftModel)."""
        return self.base_model.peft_config

    @peft_config.setter
    def peft_config(self, value: Any) -> None:
        # PEFT sets this on the model it has just injected adapters into: get_peft_model(stts_model, ...) ran.
        raise TypeError(
            "get_peft_model() on an STTSModel is not supported: PEFT would freeze the STTS scorer and could put LoRA "
            "layers inside it (target_modules='all-linear'). Apply LoRA first, then STTS: "
            "model = apply_stts(get_peft_model(vlm, lora_config), stts_config). This model now holds PEFT layers: "
            "build it again from the base model."
        )

    @property
    def architecture(self) -> ArchitectureEntry:
        """The registry entry of the base model's family (the one the model was wrapped with)."""
        return self._entry

    @property
    def transformers_model(self) -> nn.Module:
        """The transformers model (inside the PeftModel, if any)."""
        return unwrap_peft(self.base_model)

    def _check_loaded(self) -> None:
        if self._injected is None:
            raise RuntimeError("This STTSModel was unloaded; apply_stts(model, config) again to use STTS.")

    def _base_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` without the keywords only STTS reads."""
        return {k: v for k, v in inputs.items() if k not in self.architecture.stts_only_inputs}

    def _prunes(self, inputs: dict[str, Any]) -> bool:
        return id(self) not in _DISABLED.get() and self._has_videos(inputs)

    def _has_videos(self, inputs: dict[str, Any]) -> bool:
        """Whether the call holds videos to prune; warns once when it may hold videos its family cannot find."""
        if self.architecture.has_videos(inputs):
            return True
        if not self._warned_unmarked_videos:
            reason = self.architecture.unmarked_videos(self.transformers_model, inputs)
            if reason is not None:
                self._warned_unmarked_videos = True
                warnings.warn(f"STTS is not pruning this call: {reason}", stacklevel=3)
        return False

    def pruning_settings(self) -> PruningSettings:
        """The config values and mode a call made now would prune with (what a `VisionPruningPass` runs on).

        Returns:
            `PruningSettings`
        """
        c = self.stts_config
        return PruningSettings(
            prune_ratio=c.prune_ratio,
            prune_layer=c.prune_layer,
            method=c.method,
            bias_min=c.bias_min,
            keep_first_frame=c.keep_first_frame,
            detach_aux_target=c.detach_aux_target,
            aux_loss=c.aux_loss,
            logit_penalty_margin=c.logit_penalty_margin,
            key_bias=c.key_bias,
            score_gate=c.score_gate,
            seed=c.seed,
            training=self.training,
        )

    # ------------------------------------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the base model on the pruned inputs.

        Args:
            **kwargs: exactly the base model's inputs, as its processor makes them; `labels` in the unpruned layout.

        Returns:
            The base model's output over the pruned sequence, with `out.stts`: an `STTSReport` when videos were
            pruned, None when the call pruned nothing (no video, or STTS disabled). In training mode `out.loss` = LM
            loss + `aux_loss_weight` x temporal auxiliary loss (+ `logit_penalty_weight` x the logit penalty).
        """
        self._check_loaded()
        kwargs = _inputs_as_kwargs(args, kwargs, self.architecture)
        if not self.architecture.has_language_model:
            return self._forward_frames(kwargs)
        if id(self) in _DISABLED.get():
            return _with_report(self.base_model(**self._base_inputs(kwargs)), None)
        if not self._has_videos(kwargs):
            return _with_report(self._attach_scorer(self.base_model(**self._base_inputs(kwargs))), None)
        return_dict = kwargs.pop("return_dict", None)
        model_inputs, report, llm_bias = self._prune_inputs(kwargs, default_padding_side="left")
        with active_llm_key_bias(llm_bias):
            outputs = self.base_model(**model_inputs, return_dict=True)
        if outputs.get("loss") is not None:
            report.lm_loss = outputs.loss
            scorer_loss = self._scorer_loss(report)
            if scorer_loss is not None:
                share = _aux_loss_share(kwargs, outputs.loss)
                outputs["loss"] = outputs.loss + scorer_loss.to(outputs.loss.dtype) * share
        outputs = self._attach_scorer(outputs)  # e.g. nothing pruned and aux_loss_weight 0: still a graph
        outputs = _with_report(outputs, self._emit(report))
        return outputs if return_dict is not False else outputs.to_tuple()

    def _scorer_loss(self, report: STTSReport) -> torch.Tensor | None:
        """`aux_loss_weight` x the temporal aux loss + `logit_penalty_weight` x the logit penalty; None when both are 0,
        in eval mode (the pass computes neither) or when nothing was scored by a learned scorer."""
        c = self.stts_config
        terms = [
            weight * term
            for weight, term in ((c.aux_loss_weight, report.aux_loss), (c.logit_penalty_weight, report.logit_penalty))
            if term is not None and weight > 0
        ]
        return sum(terms[1:], terms[0]) if terms else None

    def _attach_scorer(self, outputs: Any) -> Any:
        """Outputs of a training call, tied to the trainable scorer by a term worth exactly 0.

        Without it, scorer-only training (the base frozen) would get a loss with no gradient from a text- or
        image-only batch (or with nothing pruned and `aux_loss_weight=0`) and `loss.backward()` would fail; and DDP
        would find the scorer's parameters unused. The term adds 0 to the scorer's gradients and nothing to any
        value (x + 0.0 == x).
        """
        scorer = self.scorer
        if not (self.training and torch.is_grad_enabled() and scorer is not None):
            return outputs
        if not any(p.requires_grad for p in scorer.parameters()):
            return outputs
        # A call of the scorer itself (on no units), so that hooks on it (FSDP's all-gather) run as usual.
        empty = torch.zeros(0, 1, scorer.input_size, device=next(scorer.parameters()).device)
        zero = scorer(empty, torch.zeros(0, dtype=torch.long, device=empty.device), output_logits=True).sum()
        for key in ("loss", "logits"):
            value = outputs.get(key) if isinstance(outputs, ModelOutput) else None
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                outputs[key] = value + zero.to(value.dtype)
        return outputs

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """`generate` of the base model on the pruned prompt.

        Decoding continues the unpruned positions (the kept tokens keep their original positions). Like the base
        model, it returns the prompt ids, UNPRUNED, followed by the new tokens.

        Args:
            **kwargs: the base model's `generate` arguments.

        Returns:
            What the base model's `generate` returns, with the unpruned prompt in `sequences`.
        """
        self._check_loaded()
        if not self.architecture.has_language_model:
            raise TypeError(f"{type(self.transformers_model).__name__} has no language model to generate with.")
        kwargs = _inputs_as_kwargs(args, kwargs, self.architecture)
        if not self._prunes(kwargs):
            return self.base_model.generate(**self._base_inputs(kwargs))
        prompt = kwargs["input_ids"]
        model_inputs, report, _ = self._prune_inputs(kwargs, default_padding_side="left")
        self._emit(report)
        pruned_length = model_inputs["input_ids"].shape[1]
        output = self.base_model.generate(**model_inputs)
        return _restore_prompt(output, prompt, pruned_length)

    def _forward_frames(self, inputs: dict[str, Any]) -> Any:
        """A ViT without a language model: run the model on the frames, pruning inside, and attach the report."""
        entry, model = self.architecture, self.transformers_model
        call_inputs, frames = entry.frames_inputs(inputs)
        if frames is None or id(self) in _DISABLED.get():
            return _with_report(self.base_model(**call_inputs), None)
        layout_inputs = {**call_inputs, entry.frames_argument: frames}
        layout = entry.video_layout(model, layout_inputs)
        last = self.stts_config.num_vision_blocks - 1
        vision_pass = self._vision_pass(layout, entry.vision_tokens(model, layout_inputs, layout), restore_block=last)
        with vision_pass.active():
            output = self.base_model(**call_inputs)
        return _with_report(output, self._emit(self._report(layout, vision_pass, sequence=None)))

    def _vision_pass(self, layout: VideoLayout, tokens: Any, **kwargs: Any) -> VisionPruningPass:
        return VisionPruningPass(self.architecture, self.pruning_settings(), self.scorer, layout, tokens, **kwargs)

    def _report(self, layout: VideoLayout, vision_pass: VisionPruningPass, sequence: Any) -> STTSReport:
        units = list(layout.units_per_video)
        return STTSReport(
            units_before=units,
            units_after=[int(k.sum()) for k in vision_pass.keep.split(units)],
            keep_masks=layout.split(vision_pass.keep),
            scores=layout.split(vision_pass.scores.detach()),
            aux_loss=vision_pass.aux_loss,
            logit_penalty=vision_pass.logit_penalty,
            sequence=sequence,
            logits=None if vision_pass.logits is None else layout.split(vision_pass.logits.detach()),
        )

    def _prune_inputs(
        self, inputs: dict[str, Any], default_padding_side: str
    ) -> tuple[dict[str, Any], STTSReport, torch.Tensor | None]:
        """Run the ViT with pruning, then cut the pruned units' placeholders out of every per-token input. Also
        returns the LLM key bias of the pruned sequence (`llm_key_bias_weight`; None when it does not apply)."""
        entry, model = self.architecture, self.transformers_model
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise STTSInputError(
                "STTS needs `input_ids` to find the video placeholder tokens; pass input_ids (not inputs_embeds) "
                "as the model's processor makes them."
            )
        entry.validate_inputs(model, inputs)
        layout = entry.video_layout(model, inputs)
        placeholder_mask = entry.placeholder_mask(model, input_ids)
        placeholder_units = entry.video_placeholder_units(layout)
        expected = sum(len(units) for units in placeholder_units)
        if int(placeholder_mask.sum()) != expected:
            raise STTSInputError(
                f"The batch holds {int(placeholder_mask.sum())} video placeholder tokens but its videos need "
                f"{expected} ({list(layout.units_per_video)} units per video); build the batch with the model's "
                "processor so that every video has its placeholders."
            )
        vision_pass = self._vision_pass(
            layout,
            entry.vision_tokens(model, inputs, layout),
            capture_blocks=entry.capture_blocks(model),
            last_block=entry.last_block(model),
        )
        with vision_pass.active():
            features = entry.encode_videos(model, inputs, vision_pass)  # per video: (placeholders, llm_hidden)
        keep = vision_pass.keep
        placeholder_keep = entry.video_placeholder_keep(layout, keep)
        positions = entry.original_positions(model, inputs)

        sequence = plan_sequence_pruning(
            placeholder_mask, torch.cat(placeholder_keep), inputs.get("attention_mask"), default_padding_side
        )
        model_inputs = {k: v for k, v in self._base_inputs(inputs).items() if k not in entry.video_inputs}
        for name, pad_value in (("input_ids", pad_token_id(model.config)), ("labels", -100), ("mm_token_type_ids", 0)):
            if model_inputs.get(name) is not None:
                model_inputs[name] = sequence.prune(model_inputs[name], pad_value)
        model_inputs["attention_mask"] = sequence.attention_mask
        model_inputs["position_ids"] = sequence.prune(positions, 0)

        kept_features = [f[k.to(f.device)] for f, k in zip(features, placeholder_keep)]
        llm_bias = self._llm_key_bias(vision_pass, placeholder_units, placeholder_keep, model_inputs["input_ids"])
        model_inputs = entry.language_model_inputs(model, model_inputs, kept_features)
        return model_inputs, self._report(layout, vision_pass, sequence), llm_bias

    def _llm_key_bias(
        self,
        vision_pass: VisionPruningPass,
        placeholder_units: list[torch.Tensor],
        placeholder_keep: list[torch.Tensor],
        pruned_ids: torch.Tensor,
    ) -> torch.Tensor | None:
        """The LLM key bias of this call: in training, when the scorer's logits carry a gradient and units were
        pruned (at prune ratio 0 nothing is pruned for it to teach)."""
        weight = self.stts_config.llm_key_bias_weight
        logits = vision_pass.logits
        if not (weight > 0 and self.training and logits is not None and logits.requires_grad):
            return None
        if not self._llm_bias_hooks:
            raise RuntimeError(
                "llm_key_bias_weight was set after apply_stts: its LLM hooks are attached when the model is wrapped. "
                "Wrap the base model again with the config that sets it."
            )
        if not vision_pass.prunes_units:
            return None
        units = torch.cat(placeholder_units).to(logits.device)
        kept_placeholder_units = units[torch.cat(placeholder_keep).to(logits.device)]  # in sequence order
        placeholders = self.architecture.placeholder_mask(self.transformers_model, pruned_ids)
        return llm_key_bias(logits, kept_placeholder_units, placeholders, weight)

    def register_report_hook(self, hook: Callable[[STTSReport], None]) -> RemovableHandle:
        """Call `hook(report)` with the `STTSReport` of every call that prunes (e.g. to log the aux loss and the
        kept fraction from a Trainer callback, which never sees the model's outputs).

        Returns:
            `torch.utils.hooks.RemovableHandle`: `.remove()` unregisters the hook.
        """
        handle = RemovableHandle(self._report_hooks)
        self._report_hooks[handle.id] = hook
        return handle

    def _emit(self, report: STTSReport) -> STTSReport:
        for hook in list(self._report_hooks.values()):
            hook(report)
        return report

    # ------------------------------------------------------------------------------------------ runtime knobs
    @contextlib.contextmanager
    def disable_stts(self) -> Iterator[STTSModel]:
        """Within this context (this thread / task only) the model is exactly the base model."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield self
        finally:
            _DISABLED.reset(token)

    def set_prune_ratio(self, prune_ratio: float) -> None:
        """Change the fraction of video units pruned, without re-wrapping (takes effect at the next call)."""
        self.stts_config = dataclasses.replace(self.stts_config, prune_ratio=prune_ratio)

    def unload(self) -> nn.Module:
        """Remove every wrapper and restore `requires_grad`, giving back the base model exactly as it was.

        Returns:
            The base model (a PeftModel if one was wrapped).
        """
        self._check_loaded()
        for parent, name, wrapper in reversed(self._injected):
            setattr(parent, name, wrapper.base_layer)
        for handle in self._llm_bias_hooks:
            handle.remove()
        self._llm_bias_hooks = []
        for parameter, requires_grad in self._requires_grad_before:
            parameter.requires_grad_(requires_grad)
        self._injected = None
        return self.base_model

    # ------------------------------------------------------------------------------------------ parameters
    def set_trainable(self, scorer: bool, base: bool) -> None:
        """Choose what trains (sets `requires_grad`): the scorer, the base model's trainable parameters, or both.

        "The base model's trainable parameters" are those that were trainable once STTS was applied: every base
        parameter with `train_base_model=True`, the adapter weights (e.g. LoRA) of a PeftModel, none otherwise. This
        is the switch of a two-phase schedule (see `STTSCallback(scorer_first_steps=...)`): first the scorer alone
        on the frozen base, then the base with the scorer frozen. A scorer keeps what it learned on a frozen base
        only while it stays frozen itself: trained on together with the base, it un-learns (README, "What the LM
        gradient learns").

        Build the optimizer before the first switch, while everything that will train is trainable: optimizers skip
        parameters without a gradient, but the Trainer and `stts_parameter_groups` leave out those that do not
        require one when they are built. Not under FSDP, which flattens parameters at wrap time.

        Args:
            scorer (`bool`): whether the scorer trains.
            base (`bool`): whether the base model's trainable parameters train.

        Raises:
            ValueError: if `base=True` and no base parameter was trainable after `apply_stts` (pass
                `train_base_model=True`, or wrap a PeftModel).
        """
        self._check_loaded()
        if base and not self._trainable_base_names:
            raise ValueError(
                "set_trainable(base=True): no base-model parameter was trainable after apply_stts. Apply STTS with "
                "STTSConfig(train_base_model=True) to train the whole base model, or wrap a PeftModel (e.g. LoRA)."
            )
        if self.scorer is not None:
            self.scorer.requires_grad_(scorer)
        for name, parameter in self.base_model.named_parameters():
            if name in self._trainable_base_names:
                parameter.requires_grad_(base)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """Returns:
        `(trainable, total)` parameter counts of the whole model, scorer included.
        """
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the trainable parameter count, as PEFT does."""
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------------------------------ save and load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save the adapter only: `stts_config.json`, `stts_model.safetensors` (scorer weights) and a model card.

        Takes PEFT's and transformers' keyword arguments where they mean something for one small scorer file.

        Args:
            save_directory (`str`): created if missing.
            is_main_process (`bool`, *optional*, defaults to True): only the main process writes (distributed runs).
            safe_serialization (`bool`): must be True: adapters are safetensors only (never pickled).
            max_shard_size: accepted and ignored: the scorer is one small file.
            push_to_hub (`bool`): also upload the adapter, to `repo_id` (default: the folder's name) with `token`,
                `private`, `commit_message`, `revision` and `create_pr` (see `push_to_hub`).

        Raises:
            ValueError: for `safe_serialization=False`. TypeError: for PEFT options that do not apply to STTS
                (`selected_adapters`, `save_embedding_layers`, ...) and unknown keywords, by name.
        """
        if not safe_serialization:
            raise ValueError(
                "STTS adapters are saved as safetensors only (nothing is ever pickled); drop safe_serialization=False."
            )
        del max_shard_size  # one small file: nothing to shard
        hub_kwargs = {k: kwargs.pop(k) for k in _PUSH_KEYWORDS if k in kwargs}
        not_for_stts = sorted(set(kwargs) & _PEFT_ONLY_SAVE_KEYWORDS)
        if not_for_stts:
            raise TypeError(
                f"save_pretrained got {not_for_stts}: PEFT options for models with several adapters or embedding "
                "layers; an STTS model has one scorer and saves only it."
            )
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)}.")
        if hub_kwargs and not push_to_hub:
            raise TypeError(f"{sorted(hub_kwargs)} only apply with push_to_hub=True.")
        save_adapter(self, save_directory, is_main_process=is_main_process)
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
            self.push_to_hub(repo_id, **hub_kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path_or_repo_id: str,
        revision: str | None = None,
        token: str | bool | None = None,
        is_trainable: bool = False,
    ) -> STTSModel:
        """Load a saved adapter onto `model`, which must be the base model (family and size) it was made for.

        Everything is checked before `model` is touched: after a failed load it is unchanged.

        Args:
            model (`nn.Module`): the base model (or a PeftModel around it).
            path_or_repo_id (`str`): a directory written by `save_pretrained`, or a Hub repo id.
            revision (`str`, *optional*): branch, tag or commit on the Hub.
            token (`str` or `bool`, *optional*): Hub token.
            is_trainable (`bool`): False (default) loads for inference: scorer frozen, model in eval mode.

        Returns:
            `STTSModel`
        """
        return load_adapter(cls, model, path_or_repo_id, revision=revision, token=token, is_trainable=is_trainable)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the adapter (config, weights, model card) to the Hub. See `stts_adapter.io.push_adapter_to_hub`."""
        return push_adapter_to_hub(self, repo_id, **kwargs)


def apply_stts(model: nn.Module, config: STTSConfig | None = None) -> STTSModel:
    """Wrap a supported VLM (or a PeftModel around one) with STTS token pruning, in place.

    Args:
        model (`nn.Module`): e.g. a `Qwen2_5_VLForConditionalGeneration`.
        config (`STTSConfig`, *optional*): defaults to `STTSConfig()`.

    Returns:
        `STTSModel`: only the scorer is trainable unless `config.train_base_model` (or LoRA from a PeftModel).
    """
    return STTSModel(model, config if config is not None else STTSConfig())


# ------------------------------------------------------------------------------------------------ internals
def _check_prune_layer(config: STTSConfig, spec: VisionSpec, last_read_block: int | None) -> None:
    """Refuse a prune_layer whose bias block (prune_layer + 1) is past the last ViT block that reaches the output."""
    last = spec.num_blocks - 2
    reason = f"its ViT has {spec.num_blocks} blocks and STTS scores block prune_layer and biases block prune_layer + 1"
    if last_read_block is not None and last_read_block - 1 < last:
        last = last_read_block - 1
        reason = (
            f"its connector reads ViT block {last_read_block} and the blocks after it never run, so block "
            "prune_layer + 1 (which carries the scorer's bias) must come no later"
        )
    if config.prune_layer > last:
        raise STTSConfigError(
            f"STTSConfig.prune_layer={config.prune_layer} is invalid for this model: {reason}, so prune_layer must "
            f"be between 0 and {last}."
        )


def _llm_key_bias_layers(model: nn.Module, entry: ArchitectureEntry, config: STTSConfig) -> nn.ModuleList | None:
    """The LLM layers to hook for `llm_key_bias_weight` (None when it is 0), or a clear error where it cannot work."""
    if config.llm_key_bias_weight == 0:
        return None
    if config.method != "scorer":
        raise STTSConfigError(
            f"STTSConfig.llm_key_bias_weight trains the learned scorer; method={config.method!r} has none. Set "
            "llm_key_bias_weight=0 or method='scorer'."
        )
    if not entry.has_language_model:
        raise STTSConfigError(
            f"STTSConfig.llm_key_bias_weight trains the scorer through an LLM; {entry.name} has none. Set "
            "llm_key_bias_weight=0."
        )
    return llm_decoder_layers(model)


def _inject_wrappers(model: nn.Module, entry: ArchitectureEntry, prune_layer: int) -> list:
    """Wrap every ViT block, the attention of block prune_layer + 1 and the connector (where the family has them).

    Returns:
        `[(parent, attribute, wrapper), ...]` in injection order, for `unload`.
    """
    injected: list[tuple[nn.Module, str, BaseLayerWrapper]] = []

    def wrap(parent: nn.Module, name: str, wrapper: BaseLayerWrapper) -> None:
        wrapper.training = wrapper.base_layer.training  # only the wrapper's own flag: its base keeps its modes
        setattr(parent, name, wrapper)
        injected.append((parent, name, wrapper))

    try:
        blocks = entry.get_vision_blocks(model)
        for index in range(len(blocks)):
            wrap(blocks, str(index), STTSBlock(blocks[index], index))
        masked_attention = getattr(entry, "mask_attention", None)
        for block in blocks if masked_attention else ():
            wrap(block.base_layer, masked_attention, STTSMaskedAttention(getattr(block.base_layer, masked_attention)))
        if entry.block_attention is not None:
            biased_block = blocks[prune_layer + 1].base_layer
            attention = getattr(biased_block, entry.block_attention)
            wrap(biased_block, entry.block_attention, STTSKeyBiasAttention(attention, entry.attention_with_key_bias))
        for path in entry.connector_paths(model):
            parent_name, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrap(parent, name, STTSConnector(getattr(parent, name)))
    except Exception:
        for parent, name, wrapper in reversed(injected):
            setattr(parent, name, wrapper.base_layer)
        raise
    return injected


def _inputs_as_kwargs(args: tuple, kwargs: dict[str, Any], entry: ArchitectureEntry) -> dict[str, Any]:
    """Name the one positional input the base models take (input_ids, or the pixels of a ViT alone)."""
    name = "input_ids" if entry.has_language_model else entry.pixel_argument
    if len(args) > 1:
        raise TypeError(f"Pass the model inputs as keyword arguments ({name} may be the only positional one).")
    if args:
        if name in kwargs:
            raise TypeError(f"{name} was given both positionally and as a keyword.")
        kwargs = {name: args[0], **kwargs}
    return kwargs


_PUSH_KEYWORDS = ("repo_id", "token", "private", "commit_message", "revision", "create_pr")
_PEFT_ONLY_SAVE_KEYWORDS = {"selected_adapters", "save_embedding_layers", "path_initial_model_for_weight_conversion"}

# transformers' (and PEFT's) adapter API: what STTS offers instead.
_ADAPTER_API = {
    "load_adapter": "load an STTS adapter with STTSModel.from_pretrained(base_model, path_or_repo_id).",
    "add_adapter": "an STTS model has one scorer; apply_stts(base_model, STTSConfig(...)) makes a new one.",
    "set_adapter": "an STTS model has one scorer; change its runtime knob with set_prune_ratio().",
    "enable_adapters": "STTS is on unless disabled; `with model.disable_stts():` runs the base model alone.",
    "disable_adapters": "`with model.disable_stts():` runs the base model alone.",
    "disable_adapter": "`with model.disable_stts():` runs the base model alone.",
    "active_adapters": "an STTS model has one scorer (model.stts_config describes it).",
    "active_adapter": "an STTS model has one scorer (model.stts_config describes it).",
    "delete_adapter": "model.unload() removes STTS and gives the base model back.",
}


def _with_report(output: Any, report: STTSReport | None) -> Any:
    """`output` with `output.stts = report` (None: this call pruned nothing), an attribute rather than a key, so
    `to_tuple()` and the Trainer do not see it; a plain tensor (e.g. timm logits) carries it too. A tuple output
    (`return_dict=False`) cannot carry it."""
    with contextlib.suppress(AttributeError):
        output.stts = report
    return output


class _ForwardWithBaseSignature:
    """`STTSModel.forward` of one model, under the signature of the base model's `forward`.

    An object rather than a closure, so that `copy.deepcopy` of the model gives a copy whose forward runs the copy,
    and the model pickles (`torch.save(model)`) as its base model does.
    """

    def __init__(self, model: STTSModel) -> None:
        self.model = model
        self.__doc__ = STTSModel.forward.__doc__  # what help(model.forward) shows

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return STTSModel.forward(self.model, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(unwrap_peft(self.model.base_model).forward)  # a PeftModel's is (*args, **kwargs)


def _aux_loss_share(inputs: dict[str, Any], loss: torch.Tensor) -> torch.Tensor | float:
    """The share of the auxiliary loss this call adds to `loss`: 1, unless the base model's LM loss is a sum over the
    call's label tokens divided by `num_items_in_batch` (the Trainer passes it to models that take loss keywords: the
    label tokens of all its gradient-accumulation steps, and of all processes with `average_tokens_across_devices`,
    which then multiplies the loss by the number of processes). The call's share of those tokens then weighs the aux
    loss as the LM loss is weighed, so the accumulated (and DDP-averaged) gradient holds `aux_loss_weight` x the aux
    loss once, whatever the accumulation and the number of processes."""
    num_items = inputs.get("num_items_in_batch")
    labels = inputs.get("labels")
    if num_items is None or labels is None:
        return 1.0
    local = labels[..., 1:].ne(-100).sum()  # as the Trainer counts them for a causal LM (the unpruned labels)
    return local.to(loss.device, loss.dtype) / torch.as_tensor(num_items, device=loss.device).to(loss.dtype)


def _restore_prompt(output: Any, prompt: torch.Tensor, pruned_length: int) -> Any:
    """Replace the pruned prompt at the start of generated sequences with the unpruned one."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    prompt = prompt.to(sequences.device).repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    restored = torch.cat([prompt, sequences[:, pruned_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    if isinstance(output, ModelOutput):
        output["sequences"] = restored
    return output
