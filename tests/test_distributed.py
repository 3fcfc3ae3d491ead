"""Distributed training for real (2 CPU processes over gloo): the Trainer example under torchrun and under
accelerate launch (DDP), and a scorer sharded with FSDP2, each against one process on the same data.

This file is also the FSDP worker: `torchrun --standalone --nproc_per_node 2 tests/test_distributed.py fsdp OUT`.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_distributed.sh"
EXAMPLE = REPO / "examples" / "train_with_trainer.py"
STEPS = 4
FSDP_STEPS = 3


def environment() -> dict[str, str]:
    bin_dir = os.path.dirname(sys.executable)  # torchrun and accelerate of this environment
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(command: list[str], **env: str) -> None:
    result = subprocess.run(command, env={**environment(), **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_arguments(output: Path, batch_size: int) -> list[str]:
    return [
        "--size", "tiny", "--output-dir", str(output), "--max-steps", str(STEPS), "--batch-size", str(batch_size),
        "--logging-steps", "2", "--summary-json", str(output / "summary-{rank}.json"),
    ]  # fmt: skip


def summaries(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(output.glob("summary-*.json"))]


def adapters(output: Path) -> dict[str, torch.Tensor]:
    return {
        **load_file(str(output / "stts" / "stts_model.safetensors")),
        **load_file(str(output / "lora" / "adapter_model.safetensors")),
    }


# --------------------------------------------------------------------------------------------- DDP
def test_trainer_example_under_torchrun_and_accelerate_launch_trains_like_one_process(tmp_path):
    """2 processes x 1 video per step (DDP) == 1 process x 2 videos per step: same scorer, same LoRA, same logged
    STTS numbers; the ranks stay identical and only rank 0 writes the adapters."""
    single, torchrun, accelerate = tmp_path / "single", tmp_path / "torchrun", tmp_path / "accelerate"
    run([sys.executable, str(EXAMPLE), *example_arguments(single, batch_size=2)])
    run(["bash", str(SCRIPT), "torchrun", *example_arguments(torchrun, batch_size=1)])
    run(
        ["bash", str(SCRIPT), "accelerate", *example_arguments(accelerate, batch_size=1)],
        MAIN_PROCESS_PORT=str(free_port()),
    )

    (reference,) = summaries(single)
    for output in (torchrun, accelerate):
        ranks = summaries(output)
        assert [s["rank"] for s in ranks] == [0, 1] and all(s["world_size"] == 2 for s in ranks)
        assert [s["main_process"] for s in ranks] == [True, False]
        assert all(s["global_step"] == STEPS for s in ranks)
        # DDP keeps the weights identical on every rank, and the callback's numbers are reduced over the ranks.
        assert len({(s["scorer_checksum"], s["lora_checksum"]) for s in ranks}) == 1
        assert ranks[0]["last_log"] == ranks[1]["last_log"]
        assert ranks[0]["reload_matches"] is True  # both adapters reload on a fresh base model
        assert sorted(os.listdir(output / "stts")) == ["README.md", "stts_config.json", "stts_model.safetensors"]
        assert sorted(os.listdir(output / "lora")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert not any("scorer" in k for k in load_file(str(output / "lora" / "adapter_model.safetensors")))
        assert all(k.startswith("scorer.") for k in load_file(str(output / "stts" / "stts_model.safetensors")))

        # Against one process on the same batches: the same training, up to float rounding.
        log, expected = ranks[0]["last_log"], reference["last_log"]
        for key in ("loss", "stts_aux_loss", "stts_lm_loss", "stts_kept_fraction", "stts_score_mean"):
            assert abs(log[key] - expected[key]) <= 1e-4 * max(1.0, abs(expected[key])), (key, log, expected)
        trained, expected_weights = adapters(output), adapters(single)
        assert trained.keys() == expected_weights.keys()
        for key in expected_weights:
            torch.testing.assert_close(trained[key], expected_weights[key], atol=2e-5, rtol=1e-3)

    # One script, two launchers: the same result, bit for bit.
    assert summaries(torchrun)[0]["scorer_checksum"] == summaries(accelerate)[0]["scorer_checksum"]
    assert summaries(torchrun)[0]["lora_checksum"] == summaries(accelerate)[0]["lora_checksum"]


# --------------------------------------------------------------------------------------------- FSDP
def fsdp_setup(rank_batches: list[int]):
    """The tiny Qwen2.5-VL + STTS of the FSDP test (the same on every process) and a batch of the given samples."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from stts_adapter import STTSConfig, apply_stts
    from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, tiny_qwen2_5_vl_config

    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config()
    model = apply_stts(Qwen2_5_VLForConditionalGeneration(config), STTSConfig(prune_layer=1))
    samples = [
        Sample(video=moving_square_video(4, 56, 56, square=14, step=(0, 7 * (i + 1)), seed=i), answer=[100 + i, 2])
        for i in rank_batches
    ]
    return model.train(), build_qwen_batch(config, samples)


def fsdp_train(model, batch, steps: int) -> None:
    from stts_adapter.training import stts_parameter_groups

    # SGD: linear in the gradients, so one process and two compare up to float rounding (Adam's first steps
    # would magnify the rounding of near-zero gradients).
    optimizer = torch.optim.SGD(stts_parameter_groups(model, scorer_lr=0.5), lr=0.1)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fsdp_worker(output: str) -> None:
    """One process of the FSDP test: the scorer is its own FSDP2 unit (sharded across the processes), the rest of
    the model the root unit; each process trains on its own video; every process calls save_pretrained."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from stts_adapter.training import STTSCallback, find_stts_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, batch = fsdp_setup([rank])
    fully_shard(model.scorer)
    fully_shard(model)
    assert find_stts_model(model) is model
    fsdp_train(model, batch, FSDP_STEPS)
    local = [p.to_local().numel() for p in model.scorer.parameters()]
    full = [p.numel() for p in model.scorer.parameters()]
    model.save_pretrained(os.path.join(output, "stts"), is_main_process=rank == 0)
    # The Trainer callback's checkpoint save, as the Trainer calls it on every process.
    STTSCallback().on_save(
        SimpleNamespace(output_dir=output),
        SimpleNamespace(global_step=FSDP_STEPS, is_world_process_zero=rank == 0),
        None,
        model=model,
    )
    with open(os.path.join(output, f"rank{rank}.json"), "w") as f:
        json.dump({"local": local, "full": full}, f)
    # Tear the process group down together, then leave without running C++ static destructors: under load a rank
    # still aborted at interpreter exit after destroy_process_group ("terminate called without an active
    # exception", a joinable std::thread destroyed in torch's gloo teardown), after all its work was written.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_fsdp2_sharded_scorer_trains_like_one_process_and_saves_whole(tmp_path):
    run(["torchrun", "--standalone", "--nproc_per_node", "2", __file__, "fsdp", str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["full"] == ranks[1]["full"]
    assert [a + b for a, b in zip(ranks[0]["local"], ranks[1]["local"])] == ranks[0]["full"]  # really sharded
    assert sum(ranks[0]["local"]) < sum(ranks[0]["full"])

    model, batch = fsdp_setup([0, 1])  # one process, both videos in one batch
    initial = {k: v.clone() for k, v in model.scorer.state_dict().items()}
    fsdp_train(model, batch, FSDP_STEPS)
    saved = load_file(str(tmp_path / "stts" / "stts_model.safetensors"))
    checkpoint = load_file(str(tmp_path / f"checkpoint-{FSDP_STEPS}" / "stts_adapter" / "stts_model.safetensors"))
    assert checkpoint.keys() == saved.keys() and all(torch.equal(checkpoint[k], saved[k]) for k in saved)
    assert saved.keys() == {"scorer." + k for k in model.scorer.state_dict()}
    assert max((saved["scorer." + k] - v).abs().max() for k, v in initial.items()) > 1e-3  # it trained
    for key, value in model.scorer.state_dict().items():
        torch.testing.assert_close(saved["scorer." + key], value, atol=1e-6, rtol=1e-4)


if __name__ == "__main__" and sys.argv[1:2] == ["fsdp"]:
    fsdp_worker(sys.argv[2])
