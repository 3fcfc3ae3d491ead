"""The tiny word-level tokenizer the families' REAL processor classes run with in tests (built offline).

Each family's testing module builds its real transformers processor (`tiny_<family>_processor`: the image and
video processors are the families' own classes, which resize, normalise, tile and sample frames as for the released
checkpoints) on this tokenizer: it maps each special token the processor writes to the id the tiny config expects,
and every other word to `<unk>` (ids stay inside the tiny vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import BOS, EOS, PAD, VOCAB_SIZE

UNK = 3
# Molmo2's prompt-only tokens (the processor replaces them; the model never sees them), below the tiny configs' ids.
MOLMO2_IMAGE_LOW, MOLMO2_IMAGE_PROMPT, MOLMO2_VIDEO_PROMPT = 988, 987, 986
WORDS = (
    *("You", "are", "provided", "the", "following", "series", "of", "frames", "from", "a", "video", "Frame"),
    *("What", "happens", "describe", "it", "image", "is", "in"),
    *("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
)


def tiny_tokenizer(special_tokens: Mapping[str, int], named_tokens: Mapping[str, str] | None = None) -> Any:
    """A word-level `PreTrainedTokenizerFast`: `special_tokens` at their ids, a few English words and the digits
    0-9, everything else `<unk>`.

    Args:
        special_tokens (`Mapping[str, int]`): token text -> id (the ids of the tiny config).
        named_tokens (`Mapping[str, str]`, *optional*): attribute name -> token text, for processors that read
            e.g. `tokenizer.start_image_token` (transformers' `extra_special_tokens`).

    Returns:
        `PreTrainedTokenizerFast`
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK, **special_tokens}
    taken = set(vocab.values())
    free = (i for i in range(VOCAB_SIZE) if i not in taken)
    for word in (*WORDS, *map(str, range(10))):
        vocab.setdefault(word, next(free))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Special tokens whole, then words, digits one by one, and punctuation; whitespace separates.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"<[^<>\s]+>|[A-Za-z]+|\d|[^\w\s]"), behavior="isolated"),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(special_tokens),
        extra_special_tokens=dict(named_tokens or {}),
    )


def merged_patch_sizes(vision: Any) -> dict[str, Any]:
    """The image / video processor settings of the Qwen-VL-style families (Qwen-VL, GLM-4.1V): the vision config's
    patch, merge and temporal patch sizes, frames resized to between 56x56 and 448x448 pixels."""
    return dict(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448},
    )
