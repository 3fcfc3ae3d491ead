"""Shared fixtures: tiny random models built from configs, saved, and loaded back per test (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing repo fails at once instead of after ~23 s

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

import stts_adapter.files
from stts_adapter.testing import tiny_qwen2_5_vl_config, tiny_qwen2_vl_config

FAMILIES = {
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, tiny_qwen2_5_vl_config),
    "qwen2_vl": (Qwen2VLForConditionalGeneration, tiny_qwen2_vl_config),
}


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """{family: directory} of tiny random models written with save_pretrained."""
    directories = {}
    for family, (model_class, make_config) in FAMILIES.items():
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(family)
        model_class(make_config()).save_pretrained(directory)
        directories[family] = directory
    return directories


def load_model(saved_models, family: str = "qwen2_5_vl", **from_pretrained_kwargs):
    """A fresh copy of a saved tiny model, in eval mode."""
    model_class, _ = FAMILIES[family]
    return model_class.from_pretrained(saved_models[family], **from_pretrained_kwargs).eval()


@pytest.fixture
def load(saved_models):
    """`load(family="qwen2_5_vl", **from_pretrained_kwargs)` -> a fresh tiny model loaded from disk."""
    return lambda family="qwen2_5_vl", **kwargs: load_model(saved_models, family, **kwargs)


@pytest.fixture
def downloads(monkeypatch):
    """Every path `hf_hub_download` returned to stts_adapter, in call order (the real download still happens)."""
    paths = []
    real = stts_adapter.files.hf_hub_download

    def spy(*args, **kwargs):
        paths.append(real(*args, **kwargs))
        return paths[-1]

    monkeypatch.setattr(stts_adapter.files, "hf_hub_download", spy)
    return paths
