"""The scorer learns: both losses reach it with the right gradient, it does not saturate, and scorer-only training
survives batches without video.

The oracles are independent of the code under test: finite differences of the model's own loss (in float64), the
spec's formulas, and the bare model.
"""

import types

import pytest
import torch
from transformers import Trainer

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.report import SATURATION
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video
from stts_adapter.training import STTSCallback, scorer_grad_norm

PRUNE_LAYER = 1
SCORER_SEED = 0


def video_samples(answers: bool = True) -> list[Sample]:
    """Two 8-frame 56x56 videos (4 temporal slots of 2x2 units) with a square moving across a textured scene."""
    return [
        Sample(
            video=moving_square_video(8, 56, 56, square=14, step=(0, 7), seed=1), answer=[31, 32] if answers else None
        ),
        Sample(
            video=moving_square_video(8, 56, 56, square=14, step=(7, 0), start=(0, 21), seed=2),
            prefix=[1, 14],
            answer=[41] if answers else None,
        ),
    ]


def capture_logits(stts):
    """Keeps the scorer's logits of the next call (with their gradient) in the returned dict."""
    captured = {}

    def hook(module, args, output):
        if output.numel() and "logits" not in captured:  # the pruning call (not the empty one that ties it to loss)
            output.retain_grad()
            captured["logits"] = output

    return captured, stts.scorer.register_forward_hook(hook)


# --------------------------------------------------------------------------------------------- the LM gradient
def lm_loss64(out, labels):
    """The LM loss in float64 (transformers computes it in float32), on the pruned sequence."""
    labels = out.stts.prune_like(labels, -100)
    logits = out.logits[:, :-1].double()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def rms_norm64(module, hidden_states):
    """Qwen's RMSNorm without its cast to float32 (which would add ~1e-7 relative noise to a float64 model)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))


def test_the_lm_gradient_on_the_scorer_matches_finite_differences(load):
    """d(LM loss)/d(scorer parameters) by autograd equals the central difference of the model's loss along random
    directions (the kept set does not change under the small steps, so the loss is smooth there). The whole model
    runs in float64 (its RMSNorms too: their float32 rounding would swamp a difference quotient). Steps are short
    (1e-5 in parameter space): the loss has kinks where the top or bottom unit of a frame changes (the bias
    rescales each frame by its min and max), here within 3e-4; a Richardson extrapolation of two step sizes removes
    the O(step^2) error. Hub kernels off: transformers >= 5.25 kernelizes layers by default (with its `kernels`
    dependency), and the kernelized model is not float64-exact (1% off the difference quotient)."""
    model = load(use_kernels=False).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm64, module)
    torch.manual_seed(SCORER_SEED)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss_weight=0.0)).train()
    batch = build_qwen_batch(model.config, video_samples())
    batch["pixel_values_videos"] = batch["pixel_values_videos"].double()
    labels = batch.pop("labels")
    out = stts(**batch)
    lm_loss64(out, labels).backward()
    keep = [m.clone() for m in out.stts.keep_masks]
    parameters = list(stts.scorer.parameters())
    analytic_gradient = [p.grad.clone() for p in parameters]
    gradient_norm = sum(float(g.square().sum()) for g in analytic_gradient) ** 0.5
    assert gradient_norm > 0
    generator = torch.Generator().manual_seed(0)
    # The gradient's own direction, then random ones; all of unit length, so eps is the distance moved.
    directions = [[g / gradient_norm for g in analytic_gradient]]
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parameters]
        norm = sum(float(d.square().sum()) for d in direction) ** 0.5
        directions.append([d / norm for d in direction])
    for direction in directions:
        analytic = sum(float((g * d).sum()) for g, d in zip(analytic_gradient, direction))

        def central_difference(eps, direction=direction):
            losses = []
            for sign in (1, -1):
                with torch.no_grad():
                    for p, d in zip(parameters, direction):
                        p.add_(sign * eps * d)
                    shifted = stts(**batch)
                    for p, d in zip(parameters, direction):
                        p.sub_(sign * eps * d)
                assert all(torch.equal(a, b) for a, b in zip(shifted.stts.keep_masks, keep))
                losses.append(float(lm_loss64(shifted, labels)))
            return (losses[0] - losses[1]) / (2 * eps)

        numeric = (4 * central_difference(1e-5) - central_difference(2e-5)) / 3
        # Within 0.1% of the gradient's norm (a random unit direction sees only ~1/sqrt(#parameters) of it).
        assert abs(analytic - numeric) <= 1e-3 * gradient_norm, (analytic, numeric, gradient_norm)


@pytest.mark.parametrize("logit_scale", [1.0, 1e3])
def test_the_lm_loss_reaches_every_frame_that_loses_units(load, logit_scale):
    """Also with a saturated scorer (logits scaled to +-hundreds: float32 scores of exactly 0.0 and 1.0), which the
    old absolute flatness test (span <= 1e-6) cut off from the LM loss. There the gradient reaches every such frame,
    but not each of its units: deep in the sigmoid's tail d(score)/d(logit) ~ e^-|logit| underflows float32."""
    model = load()
    torch.manual_seed(SCORER_SEED)
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss_weight=0.0)).train()
    with torch.no_grad():
        stts.scorer.mlp[-1].weight.mul_(logit_scale)
    captured, handle = capture_logits(stts)
    out = stts(**build_qwen_batch(model.config, video_samples()))
    handle.remove()
    out.loss.backward()
    gradient = captured["logits"].grad.detach()
    assert bool(gradient.isfinite().all())
    if logit_scale > 1:
        assert out.stts.saturated_fraction > 0.5
    # A frame that loses every unit is the exception: block k+1 attends within the frame's window here, and all of
    # that window's outputs are dropped, so its bias cannot change the loss (its gradient is exactly 0).
    frames = 0
    for keep, gradient_of_video in zip(out.stts.keep_masks, gradient.split([m.numel() for m in out.stts.keep_masks])):
        gradient_of_video = gradient_of_video.view(keep.shape)
        for frame in range(1, keep.shape[0]):
            if keep[frame].any() and not keep[frame].all():
                frames += 1
                reached = gradient_of_video[frame].abs()
                assert (reached.min() if logit_scale == 1 else reached.max()) > 0, (frame, gradient_of_video[frame])
            elif not keep[frame].any():
                assert gradient_of_video[frame].abs().max() == 0, (frame, gradient_of_video[frame])
        assert gradient_of_video[0].abs().max() == 0  # the first frame is never biased
    assert frames >= 3


# --------------------------------------------------------------------------------------------- saturation
def train_scorer(load, aux_loss: str, steps: int = 60):
    """Scorer-only training on the aux loss (the answer is constant, so the LM loss teaches nothing), at the scorer
    learning rate the README recommends (1e-3)."""
    model = load()
    config = STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, aux_loss=aux_loss, aux_loss_weight=1.0)
    torch.manual_seed(SCORER_SEED)
    stts = apply_stts(model, config).train()
    batch = build_qwen_batch(model.config, video_samples())
    optimizer = torch.optim.Adam(stts.scorer.parameters(), lr=1e-3)
    reports, norms = [], []
    for _ in range(steps):
        out = stts(**batch)
        out.loss.backward()
        norms.append(scorer_grad_norm(stts))
        optimizer.step()
        optimizer.zero_grad()
        reports.append(out.stts)
    return reports, norms


def test_the_bce_aux_loss_trains_without_saturating_where_the_papers_mse_saturates(load):
    # Over scorer seeds 0-5 (seed 0 is the one run here): BCE ended with no saturated score and 0.4-3% of its first
    # gradient norm; the MSE with 31-75% of its scores saturated and 0.05-0.13% of its first gradient norm.
    bce, bce_norms = train_scorer(load, "bce")
    assert bce[-1].saturated_fraction == 0.0
    assert bce[-1].aux_loss < 0.8 * bce[0].aux_loss
    assert bce_norms[-1] > 2e-3 * bce_norms[0]  # the scorer still has a gradient
    mse, mse_norms = train_scorer(load, "mse")
    assert mse[-1].saturated_fraction > 0.25  # the logits run off: the paper's form stops learning
    assert mse_norms[-1] < 2e-3 * mse_norms[0]


def test_the_bce_upper_aux_loss_brings_every_score_below_its_change(load):
    """On a real model, the upper-bound aux loss is trained to (nearly) 0: the scores of the units that did not
    change are pushed below 0.01, and nothing is pushed up."""
    reports, norms = train_scorer(load, "bce_upper")
    assert reports[0].aux_loss > 0.05  # at init, scores near 0.5 are above the static units' target of 0.01
    assert reports[-1].aux_loss < 0.05 * reports[0].aux_loss
    assert norms[-1] < norms[0]


@pytest.mark.parametrize(
    "losses, comes_back",
    [
        (dict(aux_loss_weight=0.0), False),
        (dict(aux_loss_weight=0.0, logit_penalty_weight=0.01), True),
        (dict(aux_loss="bce_upper"), False),
        (dict(aux_loss="bce_upper", logit_penalty_weight=0.1, logit_penalty_margin=6.0), True),
    ],
    ids=["lm-only", "lm-only+penalty", "bce_upper", "bce_upper+margin-penalty"],
)
def test_the_logit_penalty_brings_a_saturated_scorer_back(load, losses, comes_back):
    """Without the aux loss, or with the upper-bound one (silent below each unit's change), nothing bounds the
    logits' scale (the key bias is rescaled per frame): a scorer whose logits start at +-hundreds stays saturated,
    and returns within the sigmoid's slope with the logit penalty (with a margin, towards [-margin, margin])."""
    model = load()
    config = STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, **losses)
    torch.manual_seed(SCORER_SEED)
    stts = apply_stts(model, config).train()
    with torch.no_grad():
        stts.scorer.mlp[-1].weight.mul_(300.0)
    batch = build_qwen_batch(model.config, video_samples())
    optimizer = torch.optim.Adam(stts.scorer.parameters(), lr=1e-2)
    reports = []
    for _ in range(150):
        out = stts(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        reports.append(out.stts)
    assert reports[0].saturated_fraction > 0.5
    if comes_back:
        assert reports[-1].saturated_fraction == 0.0
    else:
        assert reports[-1].saturated_fraction > 0.5


def test_saturated_fraction_counts_scores_within_1e4_of_0_or_1(load):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER)).eval()
    out = stts(**build_qwen_batch(model.config, video_samples(answers=False)))
    logits = torch.cat([x.flatten() for x in out.stts.logits])
    scores = torch.cat([x.flatten() for x in out.stts.scores])
    torch.testing.assert_close(torch.sigmoid(logits), scores)
    expected = float(((scores < SATURATION) | (scores > 1 - SATURATION)).double().mean())
    assert out.stts.saturated_fraction == pytest.approx(expected)
    with torch.no_grad():
        stts.scorer.mlp[-1].weight.mul_(1e4)
    assert stts(**build_qwen_batch(model.config, video_samples(answers=False))).stts.saturated_fraction > 0.9
    assert (
        apply_stts(load(), STTSConfig(method="similarity", prune_layer=PRUNE_LAYER))(
            **build_qwen_batch(model.config, video_samples(answers=False))
        ).stts.saturated_fraction
        is None
    )


# --------------------------------------------------------------------------------------------- no video
def no_video_batches(config) -> dict[str, dict]:
    image = moving_square_video(1, 56, 56, seed=3)[0]
    return {
        "text": build_qwen_batch(config, [Sample(prefix=[1, 5, 6], answer=[7, 8]), Sample(answer=[9])]),
        "image": build_qwen_batch(config, [Sample(image=image, answer=[7])]),
    }


@pytest.mark.parametrize("kind", ["text", "image"])
def test_scorer_only_training_on_a_batch_without_video_gives_the_scorer_zero_gradients(load, kind):
    model = load()
    batch = no_video_batches(model.config)[kind]
    with torch.no_grad():
        bare = model(**batch)
    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER)).train()
    optimizer = torch.optim.AdamW(stts.scorer.parameters(), lr=1e-2)
    out = stts(**batch)
    assert torch.equal(out.loss, bare.loss) and torch.equal(out.logits, bare.logits)  # + 0.0, exactly
    out.loss.backward()  # "element 0 of tensors does not require grad" before
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() == 0, name
    optimizer.step()
    assert all(p.grad is None for p in stts.base_model.parameters())
    stts.eval()
    with torch.no_grad():
        assert not stts(**batch).logits.requires_grad


def test_the_trainer_runs_scorer_only_training_on_text_batches_between_video_batches(load, tmp_path):
    from transformers import TrainingArguments

    model = load()
    videos = build_qwen_batch(model.config, video_samples())
    text = no_video_batches(model.config)["text"]

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return videos if index % 2 == 0 else text

    stts = apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    trainer = Trainer(
        stts, args, train_dataset=Batches(), data_collator=lambda items: items[0], callbacks=[STTSCallback()]
    )
    before = {k: v.clone() for k, v in stts.scorer.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert "stts_saturated_fraction" in logs[0] and "stts_scorer_grad_norm" in logs[0]
    assert logs[0]["stts_scorer_grad_norm"] > 0
    assert "stts_kept_fraction" not in logs[1] and logs[1]["stts_scorer_grad_norm"] == 0.0  # a text-only step
    assert any(not torch.equal(before[k], v) for k, v in stts.scorer.state_dict().items())


def test_the_extreme_accepted_config_values_give_finite_outputs_and_gradients(load):
    """The smallest bias_min and the largest seed that validation accepts (below them it refuses)."""
    model = load()
    config = STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, bias_min=1e-6, seed=2**63 - 1)
    torch.manual_seed(SCORER_SEED)
    stts = apply_stts(model, config).train()
    with torch.no_grad():
        stts.scorer.mlp[-1].weight.mul_(1e3)  # spread the scores: the bias reaches log(bias_min)
    out = stts(**build_qwen_batch(model.config, video_samples()))
    out.loss.backward()
    assert bool(out.logits.isfinite().all()) and bool(out.loss.isfinite())
    assert all(bool(p.grad.isfinite().all()) for p in stts.scorer.parameters())
    stts.unload()
    random = apply_stts(model, STTSConfig(method="random", prune_layer=PRUNE_LAYER, seed=2**63 - 1)).eval()
    assert random(**build_qwen_batch(model.config, video_samples(answers=False))).stts.units_after == [8, 8]
