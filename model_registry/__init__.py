"""Built-in model families, one file each. Importing this package registers them all."""

from . import (  # noqa: F401
    glm4v,
    internvl,
    llava_next_video,
    llava_onevision,
    molmo2,
    qwen2_5_vl,
    qwen3_vl,
    smolvlm,
    timm_vit,
    video_llava,
    vision_towers,
)
