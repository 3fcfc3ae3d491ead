"""stts_adapter: learned video token pruning (STTS) for vision-language models, applied like a PEFT adapter.

```python
from stts_adapter import STTSConfig, apply_stts
model = apply_stts(vlm, STTSConfig(prune_ratio=0.5, prune_layer=3))
```
"""

from .auto import AutoSTTSModel
from .config import STTSConfig
from .errors import AdapterLoadError, STTSConfigError, STTSInputError, UnsupportedModelError
from .model import STTSModel, apply_stts
from .processing import prepare_inputs
from .registry import ArchitectureEntry, register_architecture, supported_architectures

__version__ = "0.2.0"

__all__ = [
    "AdapterLoadError",
    "ArchitectureEntry",
    "AutoSTTSModel",
    "STTSConfig",
    "STTSConfigError",
    "STTSInputError",
    "STTSModel",
    "UnsupportedModelError",
    "__version__",
    "apply_stts",
    "prepare_inputs",
    "register_architecture",
    "supported_architectures",
]
