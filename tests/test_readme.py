"""The README's code is real: its worked architecture example runs and matches the built-in entry it condenses."""

import importlib.util
import re
from pathlib import Path

import torch
from transformers import LlavaOnevisionForConditionalGeneration

from stts_adapter import STTSConfig, apply_stts, registry
from stts_adapter.testing import Sample
from stts_adapter.testing.llava_onevision import LLAVA_ONEVISION

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block_defining(name: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (block,) = [b for b in blocks if f"class {name}" in b]
    return block


def test_the_adding_an_architecture_example_prunes_like_the_builtin_entry():
    namespace: dict = {}
    exec(compile(python_block_defining("MyOneVisionEntry"), "README.md", "exec"), namespace)
    try:
        torch.manual_seed(0)
        config = LLAVA_ONEVISION.make_config()
        samples = [Sample(video=LLAVA_ONEVISION.video(i), answer=[5, 6]) for i in range(2)]
        batch = LLAVA_ONEVISION.build_batch(config, samples, "left")
        builtin_model = LlavaOnevisionForConditionalGeneration(config).eval()
        readme_model = LlavaOnevisionForConditionalGeneration(config).eval()
        readme_model.load_state_dict(builtin_model.state_dict())
        readme_model.config.model_type = "my_onevision"

        settings = STTSConfig(prune_ratio=0.5, prune_layer=1)
        builtin = apply_stts(builtin_model, settings)
        example = apply_stts(readme_model, settings)
        example.scorer.load_state_dict(builtin.scorer.state_dict())
        assert type(example.architecture).__name__ == "MyOneVisionEntry"
        expected, actual = builtin(**batch), example(**batch)
        assert actual.stts.units_after == expected.stts.units_after < actual.stts.units_before
        assert all(torch.equal(a, b) for a, b in zip(actual.stts.keep_masks, expected.stts.keep_masks))
        torch.testing.assert_close(actual.logits, expected.logits)
    finally:
        registry._REGISTRY.pop("my_onevision", None)


def test_the_results_section_is_generated_from_the_benchmark_outputs():
    """README's Results section is exactly what benchmarks/readme_results.py writes from benchmarks/results/."""
    spec = importlib.util.spec_from_file_location("readme_results", README.parent / "benchmarks" / "readme_results.py")
    readme_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_results)
    section = readme_results.generated_section(README.parent / "benchmarks" / "results")
    assert "| " in section  # the tables are there
    assert readme_results.main(["--check"]) == 0, "run python benchmarks/readme_results.py"
