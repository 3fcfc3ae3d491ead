"""`STTSConfig`: every knob of the method, validated on construction, saved as JSON next to the adapter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterLoadError, STTSConfigError
from .files import parse_json, read_small_file, resolve_adapter_file, write_file_atomically
from .losses import AUX_LOSSES

# Sizes beyond any real ViT's (the largest released ones have MLP widths of ~16k and 16-64 heads): refused at config
# time, before a loader allocates a scorer for them.
MAX_SCORER_HIDDEN_SIZE = 65536
MAX_SCORER_HEADS = 1024
MAX_CONFIG_BYTES = 1 << 20  # a saved config is ~1 KB; a larger file is not one
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MIN_BIAS_MIN = 1e-6  # a key bias of at least log(1e-6) = -13.8: finite outputs and gradients in float16 too
CONFIG_NAME = "stts_config.json"
METHODS = ("scorer", "random", "similarity")
# What an adapter saved before an option existed did; a saved config without the key gets this, not the new default.
BEHAVIOUR_BEFORE_OPTION = {"aux_loss": "mse", "scorer_input_norm": False}


@dataclass
class STTSConfig:
    """Configuration of Spatio-Temporal Token Scoring (STTS) token pruning.

    The first group of fields are the method's knobs; the second group is filled in by `apply_stts` and records
    which base model the adapter was built for, so that `STTSModel.from_pretrained` can refuse a mismatch.

    Example:
        ```python
        >>> from stts_adapter import STTSConfig
        >>> STTSConfig(prune_ratio=0.5, prune_layer=3)
        ```
    """

    prune_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of each video's pruning units removed, 0 <= prune_ratio < 1. The budget is per video: "
            "floor(prune_ratio * units_in_video) units are dropped, chosen across all of its frames."
        },
    )
    prune_layer: int = field(
        default=3,
        metadata={
            "help": "0-based index of the ViT block whose output is scored. Block prune_layer + 1 still sees every "
            "patch (with the soft key bias); blocks from prune_layer + 2 on run on kept patches only."
        },
    )
    method: str = field(
        default="scorer",
        metadata={
            "help": "'scorer' (the learned STTS scorer), 'random' (same budget, random units) or 'similarity' "
            "(training-free: drop the units most similar to the same unit in the previous frame, as EVS does)."
        },
    )
    aux_loss_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the temporal auxiliary loss added to the LM loss in training mode."},
    )
    aux_loss: str = field(
        default="bce",
        metadata={
            "help": "Form of the temporal auxiliary loss. 'bce' (ours, the default): binary cross-entropy on the "
            "scorer's logits against clamp(1 - cos, 0.01, 0.99); it keeps a gradient while a score is wrong and the "
            "logits stay finite. 'mse' (the paper): squared error between the sigmoid score and 1 - cos; its nearly "
            "binary target drives the logits to +-infinity, the sigmoid saturates and the scorer stops learning. "
            "'bce_upper' (ours): the change is an upper bound of the score, not its target: the 'bce' loss (minus its "
            "minimum) only where a score is above clamp(1 - cos, 0.01, 0.99), so what did not change is pushed down "
            "and the units that changed are not pulled up (content that changes without mattering, a screen or "
            "flicker, is not taught to score high). In the README's benchmark its scorer learns, from this loss and "
            "not from the LM loss, to drop what looks like the static background. The scores of the units it drops "
            "fall towards 0: nothing bounds the logits, so the saturated fraction the Trainer callback logs goes to 1 "
            "(expected here; selection and the key bias work on the logits). With a trained base, train in two phases "
            "(STTSCallback(scorer_first_steps=N)): in one the base moves under the scorer and misranked units stay "
            "misranked (README)."
        },
    )
    logit_penalty_weight: float = field(
        default=0.0,
        metadata={
            "help": "Ours, not in the paper: weight of the logit penalty, mean(max(|logit| - logit_penalty_margin, "
            "0)^2) over the scorer's logits (mean(logit^2) at the default margin 0), added to the loss in training. It "
            "bounds the logits' scale, which nothing else does when aux_loss_weight is 0 or small, or with "
            "aux_loss='bce_upper': the LM loss alone drives the logits apart until the sigmoid saturates. The ranking "
            "does not depend on that scale; the key bias does (at a large scale every unit but a frame's best is at "
            "log(bias_min), where the LM gradient vanishes). 0.01 with aux_loss_weight=0 is the README's lm-penalty "
            "rows; 0.1 with logit_penalty_margin=6 and aux_loss='bce_upper' its upper-margin rows."
        },
    )
    logit_penalty_margin: float = field(
        default=0.0,
        metadata={
            "help": "Ours: the logit penalty counts only the part of |logit| above this margin, "
            "mean(max(|logit| - margin, 0)^2). 0: mean(logit^2), which pulls every logit towards 0. A margin leaves "
            "the logits free inside [-margin, margin] and only keeps them from leaving it; below ~9.2 no score "
            "saturates. With aux_loss='bce_upper' it costs accuracy (the README's upper-margin rows): the scorer "
            "separates the units by growing the logits' scale."
        },
    )
    key_bias: bool = field(
        default=True,
        metadata={
            "help": "Add the soft key bias log(s') to the attention of block prune_layer + 1 in the frames that lose "
            "units (the paper): the path by which the LM loss trains the scorer. False: no bias, the scorer learns "
            "from the temporal auxiliary loss alone (an ablation)."
        },
    )
    score_gate: bool = field(
        default=False,
        metadata={
            "help": "Ours, not in the paper: in training, multiply the kept units' hidden states after block "
            "prune_layer + 1 by 1 + (logit - logit.detach()), which is exactly 1, so the LM loss reaches each kept "
            "unit's logit with how much the unit lowers the loss (gradient x input). The paper's only LM path to "
            "the scorer is the soft key bias, which can only reorder the units within a frame."
        },
    )
    llm_key_bias_weight: float = field(
        default=0.0,
        metadata={
            "help": "Ours, not in the paper: in training, add weight x (logit - logit.detach()), which is exactly 0, "
            "to the attention of every LLM layer on the key side of each kept video token. The outputs do not change; "
            "the LM loss reaches each kept unit's logit with how much it gains from attending more to the unit's "
            "token. Unlike the soft key bias (block prune_layer + 1, per-frame rescaled, every unit present), this "
            "signal compares units across frames and under the pruned set. 0: off (the paper). Needs an LLM "
            "attention that takes an additive mask (not flash attention). "
            "With aux_loss_weight=0 and logit_penalty_weight=0.01 it is the README's lm-bias rows."
        },
    )
    bias_min: float = field(
        default=math.exp(-2),
        metadata={
            "help": "Lower end of the per-frame rescaling of scores before log() in the soft key bias of block "
            "prune_layer + 1: the best unit of a frame gets bias 0, the worst log(bias_min). In (0, 1]."
        },
    )
    keep_first_frame: bool = field(
        default=True,
        metadata={"help": "Always keep every unit of each video's first frame (first temporal slot)."},
    )
    scorer_hidden_size: int | None = field(
        default=None,
        metadata={"help": "Width H of the scorer MLP (2D -> H -> H -> 1). None: the ViT's MLP width."},
    )
    scorer_num_heads: int | None = field(
        default=None,
        metadata={"help": "Heads of the scorer's attention pooling over a unit's patches. None: the ViT's heads."},
    )
    scorer_input_norm: bool = field(
        default=True,
        metadata={
            "help": "Ours: the scorer reads the ViT's patches through a LayerNorm without parameters, so its scores do "
            "not depend on the scale of the residual stream (which grows with depth and drifts when the ViT is "
            "fine-tuned) and its gradients stay finite for any input. False: the paper's scorer. Adapters saved "
            "before this option existed load with False."
        },
    )
    detach_aux_target: bool = field(
        default=True,
        metadata={
            "help": "Detach the temporal target (1 - cosine between consecutive frames) so the auxiliary loss only "
            "trains the scorer. Our choice; the reference code does not detach."
        },
    )
    train_base_model: bool = field(
        default=False,
        metadata={
            "help": "False (PEFT-style): freeze the base model, only the scorer trains. True: leave the base "
            "model's parameters trainable as they were, e.g. for full fine-tuning with the scorer."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the 'random' method in eval mode (training mode draws from torch's global RNG)."},
    )

    # Filled in by apply_stts; recorded so that an adapter is only loaded onto a base model it fits.
    architecture: str | None = field(default=None, metadata={"help": "Registry entry of the base model family."})
    base_model_class: str | None = field(default=None, metadata={"help": "Class name of the base model."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or path of the base model."})
    vision_hidden_size: int | None = field(default=None, metadata={"help": "Hidden size of the scored ViT blocks."})
    num_vision_blocks: int | None = field(default=None, metadata={"help": "Number of ViT blocks of the base model."})
    patches_per_unit: int | None = field(default=None, metadata={"help": "ViT patches per pruning unit."})
    stts_adapter_version: str | None = field(default=None, metadata={"help": "Library version that saved it."})
    weights_sha256: str | None = field(
        default=None,
        metadata={
            "help": "sha256 of the tensor data saved with this config (the weights file states it too): a load "
            "checks they belong together."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its allowed range.

        Raises:
            STTSConfigError: naming the field, the value and what is allowed.
        """
        _check(
            _is_number(self.prune_ratio) and 0 <= self.prune_ratio < 1,
            "prune_ratio",
            self.prune_ratio,
            "a number with 0 <= prune_ratio < 1 (the fraction of each video's units removed)",
        )
        _check(
            _is_int(self.prune_layer) and self.prune_layer >= 0,
            "prune_layer",
            self.prune_layer,
            "an integer >= 0 (a 0-based ViT block index)",
        )
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(self.aux_loss in AUX_LOSSES, "aux_loss", self.aux_loss, f"one of {AUX_LOSSES}")
        for name in ("aux_loss_weight", "logit_penalty_weight", "logit_penalty_margin", "llm_key_bias_weight"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value, "a number >= 0")
        _check(
            _is_number(self.bias_min) and MIN_BIAS_MIN <= self.bias_min <= 1,
            "bias_min",
            self.bias_min,
            f"a number with {MIN_BIAS_MIN:g} <= bias_min <= 1 (log(bias_min) is the lowest key bias)",
        )
        for name in (
            "keep_first_frame",
            "detach_aux_target",
            "train_base_model",
            "key_bias",
            "score_gate",
            "scorer_input_norm",
        ):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "True or False")
        for name, cap in (("scorer_hidden_size", MAX_SCORER_HIDDEN_SIZE), ("scorer_num_heads", MAX_SCORER_HEADS)):
            value = getattr(self, name)
            _check(
                value is None or (_is_int(value) and 0 < value <= cap), name, value, f"None or an integer in 1..{cap}"
            )
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", self.seed, "an integer with 0 <= seed < 2**63")
        for name in ("architecture", "base_model_class", "base_model_name_or_path", "stts_adapter_version"):
            value = getattr(self, name)
            _check(value is None or isinstance(value, str), name, value, "None or a string")
        for name in ("vision_hidden_size", "num_vision_blocks", "patches_per_unit"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value > 0), name, value, "None or an integer > 0")
        _check(
            self.weights_sha256 is None
            or (isinstance(self.weights_sha256, str) and SHA256_HEX.fullmatch(self.weights_sha256) is not None),
            "weights_sha256",
            self.weights_sha256,
            "None or 64 lowercase hexadecimal digits",
        )

    # ----------------------------------------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        """Returns:
        `dict`: every field, JSON-serialisable.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STTSConfig:
        """Build a config from a dict, e.g. a saved `stts_config.json`.

        Keys this version does not know (written by a newer version) are ignored with a warning, as PEFT does. A
        saved config (one that records `stts_adapter_version`) without a key that a later version added gets the
        behaviour it was saved with (`BEHAVIOUR_BEFORE_OPTION`), not the new default.

        Args:
            values (`dict`): field names to values.

        Returns:
            `STTSConfig`
        """
        if not isinstance(values, dict):
            raise STTSConfigError(f"An STTS config must be a JSON object (a dict), got {type(values).__name__}.")
        if values.get("stts_adapter_version") is not None:
            values = {**BEHAVIOUR_BEFORE_OPTION, **values}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown STTSConfig keys {unknown}: the adapter was probably saved by a newer "
                "stts_adapter. Upgrade stts_adapter if the adapter does not behave as expected.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in values.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the config as `stts_config.json` into `save_directory` (created if missing)."""
        os.makedirs(save_directory, exist_ok=True)
        write_file_atomically(os.path.join(save_directory, CONFIG_NAME), self.to_json_string().encode("utf-8"))

    def to_json_string(self) -> str:
        """Returns:
        `str`: the config as the indented, key-sorted JSON that `save_pretrained` writes.
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
    ) -> STTSConfig:
        """Read the `stts_config.json` of an adapter folder or Hub repo (as `PeftConfig.from_pretrained`).

        Args:
            path_or_repo_id (`str`): a folder written by `save_pretrained`, or a Hub repo id.
            revision (`str`, *optional*): branch, tag or commit on the Hub.
            token (`str` or `bool`, *optional*): Hub token.

        Raises:
            AdapterLoadError: if there is no valid config there.
        """
        return cls.from_json_file(resolve_adapter_file(path_or_repo_id, CONFIG_NAME, revision, token))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> STTSConfig:
        """Read a config written by `save_pretrained`.

        Raises:
            AdapterLoadError: if it is not a regular file of strict JSON (no duplicate keys, no NaN) holding a valid
                config.
        """
        return cls.from_json_text(read_small_file(path, MAX_CONFIG_BYTES), os.fspath(path))

    @classmethod
    def from_json_text(cls, text: str | bytes, source: str) -> STTSConfig:
        """Parse a saved config strictly (see `from_json_file`); `source` names it in errors.

        Raises:
            AdapterLoadError: naming `source` and what is wrong.
        """
        values = parse_json(text, source)
        try:
            return cls.from_dict(values)
        except (STTSConfigError, TypeError) as exc:
            raise AdapterLoadError(f"{source} is not a valid STTS config: {exc}") from exc


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise STTSConfigError(f"STTSConfig.{name}={_short_repr(value)} is invalid: expected {allowed}.")


def _short_repr(value: Any, limit: int = 200) -> str:
    """`repr(value)`, cut to `limit` characters (a hostile config can hold huge strings or numbers)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for repr
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
