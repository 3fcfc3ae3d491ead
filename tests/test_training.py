"""Training STTS the usual ways (tiny random models, CPU): LoRA + STTS with PEFT, `transformers.Trainer` with the
STTS callback and the scorer's learning rate, gradient checkpointing and gradient accumulation. The distributed
launchers are in test_distributed.py."""

import copy
import os
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, pad_rows
from stts_adapter.training import (
    SCORER_GROUP,
    STTSCallback,
    add_stts_callback,
    find_stts_model,
    stts_optimizer_cls_and_kwargs,
    stts_parameter_groups,
)

PRUNE_LAYER = 1
TOKEN_KEYS = {"input_ids": 0, "attention_mask": 0, "labels": -100, "mm_token_type_ids": 0}
STTS_KEYS = ("aux_loss", "lm_loss", "kept_fraction", "score_mean", "score_std", "score_min", "score_max")


def sample(index: int) -> Sample:
    """A 4-frame 56x56 moving-square video (2 temporal slots of 2x2 units) with a 2-token answer."""
    colors = [(1.0, 0.1, 0.1), (0.1, 0.9, 0.2), (0.2, 0.3, 1.0)]
    video = moving_square_video(
        4, 56, 56, square=14, color=colors[index % 3], step=(0, 7 * (1 + index % 2)), seed=index
    )
    return Sample(video=video, answer=[100 + index % 5, 2])


class VideoQA(torch.utils.data.Dataset):
    """Per-sample model inputs, as a processor makes them (the Trainer keeps the columns `forward` names)."""

    def __init__(self, config, size: int) -> None:
        self.config, self.size = config, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        batch = build_qwen_batch(self.config, [sample(index)])
        return {k: v[0] if k in TOKEN_KEYS else v for k, v in batch.items()}


def collate(features: list[dict]) -> dict:
    return {
        k: pad_rows([f[k].tolist() for f in features], TOKEN_KEYS[k], "left")
        if k in TOKEN_KEYS
        else torch.cat([f[k] for f in features])
        for k in features[0]
    }


def lora_stts(vlm, r: int = 4) -> STTSModel:
    """The supported recipe: LoRA on every linear layer (ViT, merger, LLM) first, then STTS on the PeftModel."""
    return apply_stts(get_peft_model(vlm, LoraConfig(r=r, target_modules="all-linear")), STTSConfig(prune_layer=1))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def training_args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        label_names=["labels"],
        train_sampling_strategy="sequential",
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Recorder(TrainerCallback):
    """Stands for a reporting integration: records the logs it is given."""

    def __init__(self) -> None:
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# --------------------------------------------------------------------------------------------- LoRA + STTS
def test_lora_and_scorer_train_together_and_save_to_their_own_files(load, tmp_path):
    model = lora_stts(load())
    peft_model = model.base_model
    names = set(trainable(model))
    scorer_names = {"scorer." + n for n, _ in model.scorer.named_parameters()}
    lora_names = {n for n in names if "lora_" in n}
    assert names == scorer_names | lora_names  # nothing else trains
    assert any(".visual." in n for n in lora_names) and any(".language_model." in n for n in lora_names)
    assert not any("lora_" in n for n, _ in model.scorer.named_modules())

    batch = collate([VideoQA(model.config, 2)[i] for i in range(2)])
    before = trainable(model)
    model.train()
    optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=1e-2, scorer_lr=1e-2))
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = trainable(model)
    changed = {n for n in names if not torch.equal(before[n], after[n])}
    assert scorer_names <= changed
    assert {n for n in lora_names if "lora_B" in n} <= changed  # LoRA B starts at zero: every one of them moved

    lora_dir, stts_dir = tmp_path / "lora", tmp_path / "stts"
    peft_model.save_pretrained(lora_dir)
    model.save_pretrained(stts_dir)
    lora_file = load_file(str(lora_dir / "adapter_model.safetensors"))
    stts_file = load_file(str(stts_dir / "stts_model.safetensors"))
    # The LoRA file holds exactly the LoRA weights a PeftModel of the bare base model has, under the same names.
    bare_lora = get_peft_model_state_dict(get_peft_model(load(), LoraConfig(r=4, target_modules="all-linear")))
    assert set(lora_file) == set(bare_lora)
    assert not any("scorer" in k for k in lora_file)
    assert set(stts_file) == {"scorer." + k for k in model.scorer.state_dict()}
    assert not any("lora" in k for k in stts_file)

    # Both load back on a fresh base model: LoRA first, then STTS, exactly the trained model.
    model.eval()
    with torch.no_grad():
        trained = model(**batch)
        with model.disable_stts():
            trained_lora_only = model(**batch)
        lora_only = PeftModel.from_pretrained(load(), lora_dir)
        reloaded = STTSModel.from_pretrained(PeftModel.from_pretrained(load(), lora_dir), stts_dir)
        again = reloaded(**batch)
        torch.testing.assert_close(lora_only(**batch).logits, trained_lora_only.logits)
    torch.testing.assert_close(again.logits, trained.logits)
    assert all(torch.equal(a, b) for a, b in zip(again.stts.keep_masks, trained.stts.keep_masks))


def test_a_lora_adapter_loads_into_a_peft_model_that_stts_already_wraps(load, tmp_path):
    trained = get_peft_model(load(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    trained.save_pretrained(tmp_path / "lora")
    model = lora_stts(load())
    model.base_model.load_adapter(tmp_path / "lora", adapter_name="loaded")
    model.base_model.set_adapter("loaded")
    batch = collate([VideoQA(model.config, 2)[i] for i in range(2)])
    model.eval()
    with torch.no_grad(), model.disable_stts():
        torch.testing.assert_close(model(**batch).logits, trained.eval()(**batch).logits)


def test_get_peft_model_on_an_stts_model_is_refused_with_the_supported_order(load):
    stts = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    with pytest.raises(TypeError, match=r"apply_stts\(get_peft_model\(vlm, lora_config\), stts_config\)"):
        get_peft_model(stts, LoraConfig(target_modules="all-linear"))


def test_saving_on_a_process_that_is_not_the_main_one_writes_nothing(load, tmp_path):
    model = lora_stts(load())
    model.save_pretrained(tmp_path / "stts", is_main_process=False)
    model.base_model.save_pretrained(tmp_path / "lora", is_main_process=False)
    assert not os.path.exists(tmp_path / "stts")
    assert not os.path.exists(tmp_path / "lora") or not os.listdir(tmp_path / "lora")  # PEFT makes the folder only


# --------------------------------------------------------------------------------------------- Trainer
def test_trainer_trains_lora_and_scorer_logs_stts_numbers_and_checkpoints_the_adapters(load, tmp_path):
    model = lora_stts(load())
    before = trainable(model)
    recorder = Recorder()
    args = training_args(
        tmp_path,
        max_steps=4,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=2,
        activation_checkpointing=True,  # gradient checkpointing of the base model's layers
    )
    optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=1e-3, scorer_lr=1e-2))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=VideoQA(model.config, 8),
        eval_dataset=VideoQA(model.config, 4),
        data_collator=collate,
        optimizers=(optimizer, None),
        callbacks=[STTSCallback()],
    )
    trainer.add_callback(recorder)  # after ours, like the progress bar and the printer
    trainer.train()

    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 4
    for log in train_logs:
        assert all(f"stts_{key}" in log for key in STTS_KEYS), log
        # The Trainer's loss is the model's: LM loss + 0.5 x aux loss, with the numbers the callback logged.
        assert log["loss"] == pytest.approx(log["stts_lm_loss"] + 0.5 * log["stts_aux_loss"], rel=1e-4)
        assert log["stts_kept_fraction"] == 0.5  # 8 units per video, 4 pruned (the first slot's 4 are kept)
        assert log["stts_video_tokens_before"] == 8 and log["stts_video_tokens_after"] == 4  # per video
        assert 0 <= log["stts_score_min"] <= log["stts_score_mean"] <= log["stts_score_max"] <= 1
        assert log["stts_score_std"] >= 0
        assert log["stts_scorer_lr"] == pytest.approx(10 * log["learning_rate"])  # the schedule scales both
    assert len({log["stts_aux_loss"] for log in train_logs}) > 1
    assert [r for r in recorder.logs if "loss" in r] == [
        {k: v for k, v in log.items() if k != "step"} for log in train_logs
    ]
    (eval_log,) = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_log["eval_stts_kept_fraction"] == 0.5 and "eval_stts_score_mean" in eval_log
    # Eval mode neither adds the aux loss to the loss nor computes it.
    assert eval_log["eval_loss"] == pytest.approx(eval_log["eval_stts_lm_loss"])
    assert "eval_stts_aux_loss" not in eval_log

    after = trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in after if n.startswith("scorer."))
    assert any(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)

    # Every checkpoint also holds both adapters, in their own folders, loadable on a fresh base model.
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    assert {"stts_adapter", "peft_adapter"} <= set(os.listdir(checkpoint))
    reloaded = STTSModel.from_pretrained(
        PeftModel.from_pretrained(load(), checkpoint / "peft_adapter"), checkpoint / "stts_adapter"
    )
    assert reloaded.scorer is not None
    card = (checkpoint / "stts_adapter" / "README.md").read_text()
    training = dict(re.findall(r"^\| ([^|]+) \| `([^`]*)` \|$", card.split("## Training", 1)[1], flags=re.M))
    assert training["steps"] == "2" and training["PEFT adapter"] == "../peft_adapter"
    assert float(training["kept fraction (last logged)"]) == 0.5
    assert float(training["scorer learning rate (last logged)"]) == pytest.approx(train_logs[1]["stts_scorer_lr"])
    final = tmp_path / "trainer" / "checkpoint-4" / "stts_adapter" / "stts_model.safetensors"
    saved = load_file(str(final))
    for key, value in model.scorer.state_dict().items():
        torch.testing.assert_close(saved["scorer." + key], value)


def test_add_stts_callback_puts_it_before_reporting_integrations(load, tmp_path):
    model = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    recorder = Recorder()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=VideoQA(model.config, 2),
        data_collator=collate,
        callbacks=[recorder],
    )
    callback = add_stts_callback(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()
    (log,) = [r for r in recorder.logs if "loss" in r]
    assert all(f"stts_{key}" in log for key in STTS_KEYS)


def test_find_stts_model_unwraps_and_refuses_a_model_without_stts(load):
    model = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    assert find_stts_model(torch.nn.DataParallel(model)) is model
    with pytest.raises(TypeError, match="apply_stts"):
        find_stts_model(load())


# --------------------------------------------------------------------------------------------- parameter groups
def test_parameter_groups_give_the_scorer_its_own_learning_rate(load):
    model = lora_stts(load())
    groups = stts_parameter_groups(model, scorer_lr=0.1, weight_decay=0.01, scorer_weight_decay=0.0)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    scorer_ids = {id(p) for p in model.scorer.parameters()}
    for group in groups:
        is_scorer = group["name"] == SCORER_GROUP
        assert all((id(p) in scorer_ids) == is_scorer for p in group["params"])
        assert group.get("lr") == (0.1 if is_scorer else None)  # others keep the optimizer's default
        assert group["weight_decay"] in ((0.0,) if is_scorer else (0.0, 0.01))
        if group["weight_decay"]:
            assert all(p.ndim >= 2 for p in group["params"])  # no decay on biases and norms

    # What it does: with the scorer's learning rate at 0 only LoRA moves, and the other way round.
    batch = collate([VideoQA(model.config, 2)[i] for i in range(2)])
    model.train()
    for lr, scorer_lr in ((1e-2, 0.0), (0.0, 1e-2)):
        before = trainable(model)
        optimizer = torch.optim.AdamW(stts_parameter_groups(model, lr=lr, scorer_lr=scorer_lr), lr=123.0)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after = trainable(model)
        moved = {n for n in after if not torch.equal(before[n], after[n])}
        assert bool(moved) and all(n.startswith("scorer.") == (scorer_lr > 0) for n in moved)


def test_the_trainer_can_build_the_optimizer_with_the_scorer_learning_rate(load, tmp_path):
    """The way for FSDP and DeepSpeed, where the Trainer creates the optimizer from the model it wrapped."""
    model = lora_stts(load())
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1, learning_rate=1e-3),
        train_dataset=VideoQA(model.config, 2),
        data_collator=collate,
        optimizer_cls_and_kwargs=stts_optimizer_cls_and_kwargs(1e-3, 1e-2, weight_decay=0.01, betas=(0.8, 0.99)),
        callbacks=[STTSCallback()],
    )
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert {g["name"] for g in groups} == {"base", SCORER_GROUP}
    assert all(g["betas"] == (0.8, 0.99) for g in groups)
    scorer_ids = {id(p) for p in model.scorer.parameters()}
    assert {id(p) for g in groups if g["name"] == SCORER_GROUP for p in g["params"]} == scorer_ids
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    assert log["stts_scorer_lr"] == pytest.approx(10 * log["learning_rate"])


# --------------------------------------------------------------------------------------------- the base model's tools
@pytest.mark.parametrize("with_lora", [False, True], ids=["scorer_only", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(load, with_lora):
    model = lora_stts(load()) if with_lora else apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    batch = collate([VideoQA(model.config, 2)[i] for i in range(2)])
    model.train()

    def gradients():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    block = model.transformers_model.model.visual.blocks[PRUNE_LAYER + 1].base_layer  # the biased block
    calls = []
    handle = block.mlp.register_forward_pre_hook(lambda module, args: calls.append(1))  # inside the checkpoint
    model.activation_checkpointing_enable()  # what Trainer(activation_checkpointing=True) calls
    checkpointed = gradients()
    handle.remove()
    assert len(calls) == 2  # the block ran again in the backward pass: checkpointing was on
    assert checkpointed.keys() == plain.keys()
    assert any(n.startswith("scorer.") for n in plain) and all(plain[n].abs().sum() > 0 for n in plain if "scorer" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_gradient_accumulation_equals_one_bigger_batch(load, tmp_path, family):
    """Two micro-batches of one video accumulated == one batch of both. LLaVA-OneVision takes the Trainer's
    `num_items_in_batch` (its LM loss is a sum over the accumulated label tokens), Qwen2.5-VL does not: the aux loss
    must be weighed like the LM loss either way."""
    if family == "qwen2_5_vl":
        base, config = load(), None
        dataset = VideoQA(base.config, 2)
        data_collator = collate
    else:
        from transformers import LlavaOnevisionForConditionalGeneration

        from stts_adapter.testing.llava_onevision import build_llava_onevision_batch, tiny_llava_onevision_config

        config = tiny_llava_onevision_config()
        torch.manual_seed(0)
        base = LlavaOnevisionForConditionalGeneration(config)
        dataset = [sample(0), sample(1)]
        data_collator = lambda samples: build_llava_onevision_batch(config, samples)

    def scorer_step(batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        model = apply_stts(copy.deepcopy(base), STTSConfig(prune_layer=PRUNE_LAYER))
        before = {k: v.clone() for k, v in model.scorer.state_dict().items()}
        args = training_args(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=1.0,
            optim="sgd",
            lr_scheduler_type="constant",
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=data_collator)
        trainer.train()
        return {k: v - before[k] for k, v in model.scorer.state_dict().items()}

    one_batch, accumulated = scorer_step(2, 1), scorer_step(1, 2)
    assert max(v.abs().max() for v in one_batch.values()) > 1e-3
    for key in one_batch:
        torch.testing.assert_close(accumulated[key], one_batch[key], atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------- two phases
class ParameterSnapshots(TrainerCallback):
    """The scorer's and the base model's weights after every optimizer step."""

    def __init__(self, model) -> None:
        self.model, self.steps = model, []

    def on_step_end(self, args, state, control, **kwargs):
        scorer = {n: p.detach().clone() for n, p in self.model.scorer.named_parameters()}
        base = {n: p.detach().clone() for n, p in self.model.base_model.named_parameters()}
        self.steps.append((scorer, base))


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("with_lora", [False, True], ids=["whole base", "lora"])
def test_scorer_first_steps_trains_the_scorer_alone_then_the_base_alone(load, tmp_path, with_lora):
    whole = STTSConfig(prune_layer=PRUNE_LAYER, train_base_model=True)
    model = lora_stts(load()) if with_lora else apply_stts(load(), whole)
    start = (
        {n: p.detach().clone() for n, p in model.scorer.named_parameters()},
        {n: p.detach().clone() for n, p in model.base_model.named_parameters()},
    )
    snapshots = ParameterSnapshots(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, learning_rate=1e-2),
        train_dataset=VideoQA(model.config, 8),
        data_collator=collate,
        callbacks=[STTSCallback(scorer_first_steps=2), snapshots],
    )
    trainer.train()
    states = [start, *snapshots.steps]
    for step in (1, 2):  # the scorer phase: the base model is the one given
        assert changed(states[step - 1][0], states[step][0])
        assert not changed(start[1], states[step][1])
    for step in (3, 4):  # the base phase: the scorer is the one the first phase left
        assert not changed(states[2][0], states[step][0])
        assert changed(states[step - 1][1], states[step][1])
    assert all(not p.requires_grad for p in model.scorer.parameters())


def test_set_trainable_switches_only_what_was_trainable_and_refuses_a_frozen_base(load):
    model = lora_stts(load())
    lora = {n for n, p in model.base_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    model.set_trainable(scorer=False, base=False)
    assert not any(p.requires_grad for p in model.parameters())
    model.set_trainable(scorer=True, base=True)
    assert {n for n, p in model.base_model.named_parameters() if p.requires_grad} == lora  # not the frozen base
    assert all(p.requires_grad for p in model.scorer.parameters())

    scorer_only = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    with pytest.raises(ValueError, match="train_base_model=True"):
        scorer_only.set_trainable(scorer=True, base=True)
    with pytest.raises(ValueError, match="scorer_first_steps must be an integer >= 0"):
        STTSCallback(scorer_first_steps=-1)
