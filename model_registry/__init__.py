"""Built-in model families, one file each. Importing this package registers them all."""

from . import llava_onevision, molmo2, qwen2_5_vl, qwen3_vl, smolvlm, timm_vit, vision_towers  # noqa: F401
