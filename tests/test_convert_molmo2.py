"""Importing the official Molmo2 STTS scorer: on a synthetic checkpoint with the official key names and shapes, the
converted scorer gives the scores of the official scorer's computation (re-derived here from its definition in
allenai/molmo2 `olmo/nn/temporal_image_vit.py`: mean-query attention pooling, [previous, current], SiLU MLP,
sigmoid), for plain and grouped-query attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stts_adapter.convert import (
    OFFICIAL_SCORER,
    molmo2_adapter_config,
    molmo2_scorer_state_dict,
    read_molmo2_checkpoint,
)
from stts_adapter.errors import AdapterLoadError
from stts_adapter.scorer import STTSScorer

WIDTH, HIDDEN, HEADS, PATCHES = 64, 128, 4, 9


def official_tensors(key_value_heads: int = HEADS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the official names and shapes (nn.Linear: (out, in))."""
    generator = torch.Generator().manual_seed(seed)
    head_dim = WIDTH // HEADS

    def linear(name: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        scale = 1 / math.sqrt(in_features)
        return {
            f"{name}.weight": torch.randn(out_features, in_features, generator=generator) * scale,
            f"{name}.bias": torch.randn(out_features, generator=generator) * 0.1,
        }

    tensors = {}
    tensors |= linear("patch_token_pooler.wq", HEADS * head_dim, WIDTH)
    tensors |= linear("patch_token_pooler.wk", key_value_heads * head_dim, WIDTH)
    tensors |= linear("patch_token_pooler.wv", key_value_heads * head_dim, WIDTH)
    tensors |= linear("patch_token_pooler.wo", WIDTH, HEADS * head_dim)
    tensors |= linear("mlp.w1", HIDDEN, 2 * WIDTH)
    tensors |= linear("mlp.w2", HIDDEN, HIDDEN)
    tensors |= linear("mlp.w3", 1, HIDDEN)
    return tensors


def official_scores(tensors, frames: torch.Tensor, key_value_heads: int) -> torch.Tensor:
    """The official scorer on full windows. `frames`: (T, units, patches, D) -> (T, units) scores."""
    head_dim = WIDTH // HEADS

    def linear(name, x):
        return F.linear(x, tensors[f"{name}.weight"], tensors[f"{name}.bias"])

    patches = frames.flatten(0, 1)  # (T * units, P, D)
    query = linear("patch_token_pooler.wq", patches.mean(1, keepdim=True)).unflatten(-1, (HEADS, head_dim))
    key = linear("patch_token_pooler.wk", patches).unflatten(-1, (key_value_heads, head_dim))
    value = linear("patch_token_pooler.wv", patches).unflatten(-1, (key_value_heads, head_dim))
    key = key.repeat_interleave(HEADS // key_value_heads, dim=2)
    value = value.repeat_interleave(HEADS // key_value_heads, dim=2)
    weights = torch.einsum("nqhd,nkhd->nhqk", query / math.sqrt(head_dim), key).softmax(-1)
    pooled = torch.einsum("nhqk,nkhd->nqhd", weights, value).flatten(-2)
    pooled = linear("patch_token_pooler.wo", pooled).reshape(frames.shape[0], frames.shape[1], WIDTH)
    previous = torch.cat([torch.zeros_like(pooled[:1]), pooled[:-1]])
    x = torch.cat([previous, pooled], dim=-1)
    x = linear("mlp.w3", F.silu(linear("mlp.w2", F.silu(linear("mlp.w1", x)))))
    return torch.sigmoid(x.squeeze(-1))


@pytest.mark.parametrize("key_value_heads", [HEADS, 2, 1])
def test_the_converted_scorer_scores_as_the_official_one(key_value_heads):
    official = official_tensors(key_value_heads)
    state = molmo2_scorer_state_dict(official, num_heads=HEADS)
    scorer = STTSScorer(WIDTH, HIDDEN, HEADS, input_norm=False)
    scorer.load_state_dict(state, strict=True)
    frames = torch.randn(5, 4, PATCHES, WIDTH, generator=torch.Generator().manual_seed(1))
    units = frames.shape[1]
    previous_unit = torch.arange(frames.shape[0] * units) - units  # the same unit one frame earlier, -1 on frame 0
    previous_unit[:units] = -1
    scores = scorer(frames.flatten(0, 1), previous_unit).reshape(frames.shape[:2])
    torch.testing.assert_close(scores, official_scores(official, frames, key_value_heads), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_needs_the_head_count():
    with pytest.raises(AdapterLoadError, match="num_heads"):
        molmo2_scorer_state_dict(official_tensors(key_value_heads=2))


def test_a_missing_tensor_is_named():
    official = official_tensors()
    del official["mlp.w2.bias"]
    with pytest.raises(AdapterLoadError, match=r"mlp\.w2\.bias"):
        molmo2_scorer_state_dict(official)


def test_the_checkpoint_reader_takes_the_scorer_and_counts_the_vit_blocks(tmp_path):
    tensors = {OFFICIAL_SCORER + name: tensor for name, tensor in official_tensors().items()}
    for block in range(6):
        tensors[f"vision_backbone.image_vit.transformer.resblocks.{block}.attention.wq.weight"] = torch.zeros(2, 2)
    tensors["transformer.wte.embedding"] = torch.zeros(3, 2)
    save_file(dict(list(tensors.items())[:10]), tmp_path / "model-00001-of-00002.safetensors")
    save_file(dict(list(tensors.items())[10:]), tmp_path / "model-00002-of-00002.safetensors")
    scorer, blocks = read_molmo2_checkpoint(tmp_path)
    assert blocks == 6
    assert set(scorer) == set(official_tensors())
    config = molmo2_adapter_config(molmo2_scorer_state_dict(scorer), num_vision_blocks=blocks)
    assert (config.vision_hidden_size, config.scorer_hidden_size, config.num_vision_blocks) == (WIDTH, HIDDEN, 6)
    assert config.scorer_input_norm is False and config.architecture == "molmo2"
    save_file({"transformer.wte.embedding": torch.zeros(3, 2)}, tmp_path / "other.safetensors")
    with pytest.raises(AdapterLoadError, match="not a Molmo2 checkpoint trained with STTS"):
        read_molmo2_checkpoint(tmp_path / "other.safetensors")


def test_the_cli_writes_an_adapter_that_loads_onto_molmo2_and_prunes(tmp_path, capsys):
    from stts_adapter import STTSModel
    from stts_adapter.cli import main
    from stts_adapter.testing import Sample
    from stts_adapter.testing.molmo2 import MOLMO2

    official = official_tensors()
    tensors = {OFFICIAL_SCORER + name: tensor for name, tensor in official.items()}
    tensors |= {f"vision_backbone.image_vit.transformer.resblocks.{i}.mlp.w1.weight": torch.zeros(1) for i in range(6)}
    save_file(tensors, tmp_path / "model.safetensors")
    out = tmp_path / "adapter"
    assert main(["convert-molmo2", str(tmp_path / "model.safetensors"), str(out), "--prune-layer", "1"]) == 0
    assert "64-wide scorer" in capsys.readouterr().out

    torch.manual_seed(0)
    config = MOLMO2.make_config()
    model = MOLMO2.model_class(config).eval()
    stts = STTSModel.from_pretrained(model, str(out))
    expected = molmo2_scorer_state_dict(official)
    assert all(torch.equal(stts.scorer.state_dict()[k], v) for k, v in expected.items())
    assert stts.stts_config.scorer_input_norm is False
    batch = MOLMO2.build_batch(config, [Sample(video=MOLMO2.video(0)), Sample(video=MOLMO2.video(1))], "left")
    report = stts(**batch).stts
    assert report.units_after == [u - u // 2 for u in report.units_before]
