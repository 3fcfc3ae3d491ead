"""The REAL transformers processor classes of the tiny models, with a tiny word-level tokenizer built offline.

The image and video processors are the families' own classes (they resize, normalise, tile and sample frames as
for the released checkpoints); only the tokenizer is tiny: it maps each special token the processor writes to the
id the tiny config expects, and every other word to `<unk>` (ids stay inside the tiny vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import BOS, EOS, IMAGE_TOKEN, PAD, VIDEO_TOKEN, VISION_END, VISION_START, VOCAB_SIZE

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


def tiny_smolvlm_processor(config: Any) -> Any:
    """`SmolVLMProcessor` (with `SmolVLMImageProcessor` and `SmolVLMVideoProcessor`) for `tiny_smolvlm_config`:
    frames and images resized to the vision image size, no image splitting.

    Needs `num2words` (the processor spells out the frame count) and torchvision (the video processor).
    """
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    from .smolvlm import FAKE_TOKEN_AROUND_IMAGE, GLOBAL_IMAGE_TOKEN, smolvlm_tokens_per_image

    tokenizer = tiny_tokenizer(
        {
            "<image>": config.image_token_id,
            "<video>": VIDEO_TOKEN,
            "<fake_token_around_image>": FAKE_TOKEN_AROUND_IMAGE,
            "<global-img>": GLOBAL_IMAGE_TOKEN,
            "<end_of_utterance>": EOS,
        }
    )
    side = {"longest_edge": config.vision_config.image_size}
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=side, max_image_size=side),
        tokenizer=tokenizer,
        image_seq_len=smolvlm_tokens_per_image(config),
    )


def tiny_internvl_processor(config: Any, max_patches: int = 4) -> Any:
    """`InternVLProcessor` (with `GotOcr2ImageProcessor` and `InternVLVideoProcessor`) for `tiny_internvl_config`:
    tiles and frames of the vision image size, images cut into up to `max_patches` tiles plus a thumbnail.

    Needs torchvision (the video processor).
    """
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    from .internvl import internvl_tokens_per_tile

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = tiny_tokenizer(
        {"<IMG_CONTEXT>": IMAGE_TOKEN, "<img>": VISION_START, "</img>": VISION_END, "<video>": VIDEO_TOKEN}, named
    )
    size = config.vision_config.image_size
    tile = {"height": size[0], "width": size[1]}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=max_patches),
        video_processor=InternVLVideoProcessor(size=tile),
        tokenizer=tokenizer,
        image_seq_length=internvl_tokens_per_tile(config),
    )


def tiny_qwen_vl_processor(
    config: Any, processor_class: str = "Qwen2_5_VLProcessor", video_processor_class: str = "Qwen2VLVideoProcessor"
) -> Any:
    """A Qwen-VL processor (`Qwen2_5_VLProcessor`, `Qwen2VLProcessor` or `Qwen3VLProcessor`, with
    `Qwen2VLImageProcessor` and the family's video processor) for the tiny Qwen configs: the config's patch, merge
    and temporal patch sizes, frames resized between 56x56 and 448x448 pixels, every frame given kept (no frame
    sampling).

    Needs torchvision (the video processor).
    """
    import transformers

    sizes = _merged_patch_sizes(config.vision_config)
    tokenizer = tiny_tokenizer(
        {
            "<|image_pad|>": config.image_token_id,
            "<|video_pad|>": config.video_token_id,
            "<|vision_start|>": config.vision_start_token_id,
            "<|vision_end|>": config.vision_end_token_id,
        }
    )
    return getattr(transformers, processor_class)(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes),
        video_processor=getattr(transformers, video_processor_class)(
            **sizes, do_sample_frames=False, cap_pixels_per_frame=True
        ),
        tokenizer=tokenizer,
    )


def tiny_llava_onevision_processor(config: Any) -> Any:
    """`LlavaOnevisionProcessor` (with `LlavaOnevisionImageProcessor` and `LlavaOnevisionVideoProcessor`) for
    `tiny_llava_onevision_config`: frames resized to the vision image size, every frame given kept."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=[[side, side]]),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=square, do_sample_frames=False),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def tiny_llava_next_video_processor(config: Any) -> Any:
    """`LlavaNextVideoProcessor` (with `LlavaNextImageProcessor` and `LlavaNextVideoVideoProcessor`) for
    `tiny_llava_next_video_config`: frames resized and center-cropped to the vision image size."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.LlavaNextVideoProcessor(
        image_processor=transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size=square, image_grid_pinpoints=[[side, side]]
        ),
        video_processor=transformers.LlavaNextVideoVideoProcessor(
            size={"shortest_edge": side}, crop_size=square, do_sample_frames=False
        ),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0,
    )


def tiny_video_llava_processor(config: Any) -> Any:
    """`VideoLlavaProcessor` (with `VideoLlavaImageProcessor` and `VideoLlavaVideoProcessor`) for
    `tiny_video_llava_config`: frames resized and center-cropped to the vision image size, a CLS placeholder per
    frame."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.VideoLlavaProcessor(
        image_processor=transformers.VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size=square),
        video_processor=transformers.VideoLlavaVideoProcessor(
            size={"shortest_edge": side}, crop_size=square, do_sample_frames=False
        ),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )


def tiny_glm4v_processor(config: Any) -> Any:
    """`Glm4vProcessor` (with `Glm4vImageProcessor` and `Glm4vVideoProcessor`) for `tiny_glm4v_config`: the config's
    patch, merge and temporal patch sizes, frames resized between 56x56 and 448x448 pixels, every frame kept."""
    import transformers

    from .glm4v import IMAGE_END, IMAGE_START, VIDEO_END, VIDEO_START

    sizes = _merged_patch_sizes(config.vision_config)
    tokenizer = tiny_tokenizer(
        {
            "<|image|>": config.image_token_id,
            "<|video|>": config.video_token_id,
            "<|begin_of_video|>": VIDEO_START,
            "<|end_of_video|>": VIDEO_END,
            "<|begin_of_image|>": IMAGE_START,
            "<|end_of_image|>": IMAGE_END,
        }
    )
    return transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(**sizes),
        video_processor=transformers.Glm4vVideoProcessor(**sizes, do_sample_frames=False),
        tokenizer=tokenizer,
    )


def tiny_molmo2_processor(config: Any) -> Any:
    """`Molmo2Processor` (with `Molmo2ImageProcessor` and `Molmo2VideoProcessor`) for `tiny_molmo2_config`: frames
    resized to the vision image size, 3x3 pooling windows, every frame kept. The prompt's video token is
    `<|video|>` (an id of its own: the model never sees it)."""
    import transformers

    from .molmo2 import FRAME_END, FRAME_START, IMAGE_COL, IMAGE_END, IMAGE_START, LOW_RES_IMAGE_START, POOLING_SIZE

    side = {"height": config.vision_config.image_size[0], "width": config.vision_config.image_size[1]}
    patch = config.vision_config.patch_size
    tokenizer = tiny_tokenizer(
        {
            "<im_patch>": config.image_patch_id,
            "<im_col>": IMAGE_COL,
            "<im_start>": IMAGE_START,
            "<low_res_im_start>": LOW_RES_IMAGE_START,
            "<frame_start>": FRAME_START,
            "<im_end>": IMAGE_END,
            "<frame_end>": FRAME_END,
            "<im_low>": MOLMO2_IMAGE_LOW,
            "<|image|>": MOLMO2_IMAGE_PROMPT,
            "<|video|>": MOLMO2_VIDEO_PROMPT,
        }
    )
    return transformers.Molmo2Processor(
        image_processor=transformers.Molmo2ImageProcessor(size=side, patch_size=patch),
        video_processor=transformers.Molmo2VideoProcessor(
            size=side, patch_size=patch, pooling_size=list(POOLING_SIZE), do_sample_frames=False
        ),
        tokenizer=tokenizer,
    )


def _merged_patch_sizes(vision: Any) -> dict[str, Any]:
    """The image / video processor settings of the Qwen-VL-style families (Qwen-VL, GLM-4.1V): the vision config's
    patch, merge and temporal patch sizes, frames resized to between 56x56 and 448x448 pixels."""
    return dict(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": 56 * 56, "longest_edge": 448 * 448},
    )
