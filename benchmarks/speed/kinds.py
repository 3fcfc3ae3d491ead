"""What the speed benchmark measures: the four kinds of measurement and their labels."""

from __future__ import annotations

NEW_TOKENS = 16


KINDS = ("forward", "generate", "train_scorer", "train_whole")


KIND_TITLES = {
    "forward": "forward (prefill)",
    "generate": f"generate {NEW_TOKENS} tokens",
    "train_scorer": "train step, scorer only",
    "train_whole": "train step, whole model",
}


KIND_COLUMNS = {
    "forward": "forward",
    "generate": f"generate {NEW_TOKENS}",
    "train_scorer": "train, scorer only",
    "train_whole": "train, whole model",
}
