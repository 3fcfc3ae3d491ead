"""The LLM key bias (`llm_key_bias_weight`, ours): worth 0 in every output, the derivative of a real key bias in the
LLM's attention in gradient, attached by apply_stts and removed by unload, refused where it cannot work.

Oracles: the same model without the option (outputs), central differences of the model's loss under a real bias
(gradient), and the layers' hooks before apply_stts (unload).
"""

import types

import pytest
import timm
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import stts_adapter.model
from stts_adapter import STTSConfig, apply_stts
from stts_adapter.errors import STTSConfigError
from stts_adapter.layers import BaseLayerWrapper
from stts_adapter.llm_bias import active_llm_key_bias, attach_llm_key_bias, llm_decoder_layers
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video

WEIGHT = 0.3


def padded_batch(config) -> dict[str, torch.Tensor]:
    """Two 8-frame videos with prompts of different lengths: left padding in the LLM's mask."""
    samples = [
        Sample(video=moving_square_video(8, 56, 56, square=14, step=(0, 7), seed=1), answer=[31, 32]),
        Sample(
            video=moving_square_video(8, 56, 56, square=14, step=(7, 0), start=(0, 21), seed=2),
            prefix=[1, 14, 15, 16, 17, 18, 19],
            answer=[41],
        ),
    ]
    return build_qwen_batch(config, samples, padding_side="left")


def wrapped(model, weight: float, **options):
    torch.manual_seed(0)  # the same scorer for every weight
    config = STTSConfig(prune_ratio=0.5, prune_layer=1, llm_key_bias_weight=weight, **options)
    return apply_stts(model, config).train()


def hooks_on(model) -> int:
    return sum(len(layer._forward_pre_hooks) for layer in model.get_decoder().layers)


def test_the_llm_key_bias_changes_no_output_and_adds_an_lm_gradient_to_the_scorer(load):
    model = load()
    batch = padded_batch(model.config)
    assert batch["attention_mask"].min() == 0  # the LLM's mask holds padding
    runs = {}
    for weight in (0.0, WEIGHT):
        stts = wrapped(model, weight)
        out = stts(**batch)
        out.loss.backward()
        runs[weight] = out, torch.cat([p.grad.flatten() for p in stts.scorer.parameters()])
        with torch.no_grad():
            evaluated = stts.eval()(**batch).logits
        runs[weight] += (evaluated,)
        stts.unload()
    (plain, plain_grad, plain_eval), (biased, biased_grad, biased_eval) = runs[0.0], runs[WEIGHT]
    # The bias is 0 in value: the same loss and logits (up to SDPA's explicit-mask kernel against its causal one) at
    # every real token (a padding query attends to nothing; what it outputs is arbitrary either way)
    torch.testing.assert_close(biased.loss, plain.loss)
    real = biased.stts.prune_like(batch["attention_mask"], 0).bool()
    torch.testing.assert_close(biased.logits[real], plain.logits[real])
    assert torch.equal(biased_eval, plain_eval)  # and in eval mode nothing is added at all
    # ...and a second LM path to the scorer
    assert (biased_grad - plain_grad).norm() > 1e-3 * plain_grad.norm()


def test_the_scorer_gets_weight_times_the_derivative_of_a_real_key_bias_on_each_kept_token(load, monkeypatch):
    """d(loss)/d(logit of a kept unit) = weight x d(loss)/d(a key bias added to its token in every LLM layer); pruned
    units get nothing. The LM loss is the only term (no aux loss, no soft key bias in the ViT)."""
    model = load()
    batch = padded_batch(model.config)
    options = dict(aux_loss_weight=0.0, key_bias=False)
    captured = {}

    def keep_logits(module, args, output):
        if output.numel() and "logits" not in captured:
            output.retain_grad()
            captured["logits"] = output

    stts = wrapped(model, WEIGHT, **options)
    handle = stts.scorer.register_forward_hook(keep_logits)
    out = stts(**batch)
    out.loss.backward()
    handle.remove()
    keep = torch.cat([k.flatten() for k in out.stts.keep_masks])
    logit_grad = captured["logits"].grad
    assert torch.all(logit_grad[~keep] == 0) and logit_grad[keep].abs().max() > 0

    # The same call with a real bias (a leaf of zeros) in place of the straight-through one: its gradient.
    leaves = {}

    def leaf_bias(logits, placeholder_units, placeholders, weight):
        leaves["bias"] = torch.zeros(placeholders.shape, requires_grad=True)
        leaves["placeholders"] = placeholders
        return leaves["bias"]

    monkeypatch.setattr(stts_adapter.model, "llm_key_bias", leaf_bias)
    stts.zero_grad()
    stts(**batch).loss.backward()
    bias_grad = leaves["bias"].grad[leaves["placeholders"]]  # row after row: the kept units' order
    torch.testing.assert_close(logit_grad[keep], WEIGHT * bias_grad)


def test_the_hooked_layers_add_the_bias_to_every_attention_as_its_finite_differences_say(load):
    """The gradient of the loss with respect to the bias that the hooks add is the derivative of the loss: central
    differences of the float64 model, with padding in the mask."""
    model = load(use_kernels=False).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm64, module)
    handles = attach_llm_key_bias(llm_decoder_layers(model))
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    attention_mask = (input_ids != 0).long()
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]  # the answer, predicted from real tokens (never from a padding query)

    def loss(bias):  # in float64 (transformers computes its loss in float32)
        with active_llm_key_bias(bias):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    bias = torch.zeros(input_ids.shape, dtype=torch.float64, requires_grad=True)
    loss(bias).backward()
    for row, column in ((0, 3), (1, 0), (1, 5)):
        step = torch.zeros_like(bias)
        step[row, column] = 1e-6
        with torch.no_grad():
            numeric = (loss(step) - loss(-step)) / 2e-6
        assert abs(float(bias.grad[row, column]) - float(numeric)) < 1e-7 + 1e-5 * abs(float(numeric))
    assert bias.grad.abs().max() > 0
    for handle in handles:
        handle.remove()


def _rms_norm64(module, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))


def test_unload_removes_the_llm_hooks(load):
    model = load()
    before = hooks_on(model)
    stts = wrapped(model, WEIGHT)
    assert hooks_on(model) == before + len(model.get_decoder().layers)
    stts.unload()
    assert hooks_on(model) == before


def test_the_llm_key_bias_is_refused_where_it_cannot_work(load):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=4)
    with pytest.raises(STTSConfigError, match="has none"):
        apply_stts(vit, STTSConfig(prune_ratio=0.5, prune_layer=1, llm_key_bias_weight=WEIGHT))
    assert not any(isinstance(m, BaseLayerWrapper) for m in vit.modules())  # nothing half-changed
    model = load()
    with pytest.raises(STTSConfigError, match="learned scorer"):
        apply_stts(model, STTSConfig(prune_ratio=0.5, method="similarity", llm_key_bias_weight=WEIGHT))
    flash = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(STTSConfigError, match="additive mask"):
        llm_decoder_layers(flash)
    with pytest.raises(ValueError, match="llm_key_bias_weight"):
        STTSConfig(llm_key_bias_weight=-1.0)
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and hooks_on(model) == 0


def test_the_llm_key_bias_gives_the_same_gradients_under_activation_checkpointing(load):
    """The hooks run at the layer's call, outside its checkpoint: the recomputed layer sees the same biased mask."""
    model = load()
    batch = padded_batch(model.config)
    stts = wrapped(model, WEIGHT, aux_loss_weight=0.0, key_bias=False)

    def gradients():
        stts.zero_grad()
        stts(**batch).loss.backward()
        return torch.cat([p.grad.flatten() for p in stts.scorer.parameters()])

    plain = gradients()
    layer = model.get_decoder().layers[0]
    calls = []
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))  # inside the checkpoint
    stts.activation_checkpointing_enable()
    checkpointed = gradients()
    handle.remove()
    assert len(calls) == 2  # the layer ran again in the backward pass: checkpointing was on
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, atol=1e-7, rtol=1e-4)
