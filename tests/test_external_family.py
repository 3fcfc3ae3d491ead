"""A family from outside the package, added as the README's "Adding an architecture" says: a toy package holds its
own model classes, the README's entry (the code block, verbatim) and a `FamilyCase`, and declares the entry in the
`stts_adapter.architectures` entry-point group. The registry finds it with no import of it and no edit to the core,
and the whole conformance suite passes on it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_readme import python_block_defining

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "toy_stts_family"

MODELS = '''
"""A new model family as a third party ships it: its own config and model classes (here LLaVA-OneVision's)."""
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration


class MyOneVisionConfig(LlavaOnevisionConfig):
    model_type = "my_onevision"


class MyOneVisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    config_class = MyOneVisionConfig
'''

TESTING = '''
"""The family's tiny model and processor-faithful batches for the conformance suite."""
import dataclasses

from stts_adapter.testing.llava_onevision import LLAVA_ONEVISION

from .models import MyOneVisionConfig, MyOneVisionForConditionalGeneration


def make_config():
    values = LLAVA_ONEVISION.make_config().to_dict()
    values.pop("model_type")
    return MyOneVisionConfig.from_dict(values)


MY_CASE = dataclasses.replace(
    LLAVA_ONEVISION,
    name="my_onevision",
    model_class=MyOneVisionForConditionalGeneration,
    make_config=make_config,
    make_processor=None,
)
'''


@pytest.fixture(scope="module")
def toy_package(tmp_path_factory) -> Path:
    """A folder to put on PYTHONPATH: the package and the `.dist-info` that declares its entry point."""
    root = tmp_path_factory.mktemp("site")
    package = root / PACKAGE
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(MODELS)
    (package / "stts.py").write_text(python_block_defining("MyOneVisionEntry"))
    (package / "testing.py").write_text(TESTING)
    dist_info = root / f"{PACKAGE}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-stts-family\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[stts_adapter.architectures]\nmy_onevision = {PACKAGE}.stts:MyOneVisionEntry\n"
    )
    return root


def run(toy_package: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(toy_package), str(REPO / "tests")]), **env}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True, timeout=600
    )


def test_the_registry_finds_the_entry_through_its_entry_point(toy_package):
    script = textwrap.dedent(f"""
        import sys
        from stts_adapter import apply_stts, supported_architectures
        from {PACKAGE}.testing import MY_CASE  # the model classes and the case; nothing registers the entry
        assert "{PACKAGE}.stts" not in sys.modules
        model = MY_CASE.model_class(MY_CASE.make_config())
        stts = apply_stts(model)
        entry = type(stts.architecture)
        print(entry.__module__, entry.__name__, "my_onevision" in supported_architectures())
    """)
    result = run(toy_package, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"{PACKAGE}.stts", "MyOneVisionEntry", "True"]


def test_the_conformance_suite_passes_on_the_external_family(toy_package):
    """Every test the built-in LLaVA-OneVision case runs (the real-processor ones aside: the toy has no processor
    class of its own) passes on the toy, none skipped."""
    pytest_args = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conformance.py")
    cases = {"STTS_CONFORMANCE_CASES": f"{PACKAGE}.testing:MY_CASE"}
    builtin = run(toy_package, *pytest_args, "--collect-only", "-k", "llava_onevision and not processor", **cases)
    expected = sum("[llava_onevision" in line for line in builtin.stdout.splitlines())
    result = run(toy_package, *pytest_args, "-k", "my_onevision", **cases)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert expected >= 15 and summary.startswith(f"{expected} passed, ") and "skipped" not in summary, summary
