"""Peak memory of a whole-model training step, each measured in a fresh process of its own."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import resource
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.speed.families import FAMILIES
from benchmarks.speed.measure import bare, train_step
from stts_adapter import STTSConfig, apply_stts


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak RSS of this process in bytes: VmHWM on Linux, else ru_maxrss (KiB on Linux, bytes on macOS).

    Not ru_maxrss on Linux: a spawned child is forked from the parent before it execs, and exec folds the forked
    copy's RSS (the parent's, ~1.3 GB after the timing phase) into the ru_maxrss of the child, where clear_refs
    cannot reset it. VmHWM is the child's own memory map's high-water mark.
    """
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux: /proc/self/clear_refs), so that the peak of the measured step
    is not hidden by a higher one while importing and building the model."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def step_peak_mib(step: Callable[[], object], device: str) -> dict[str, Any]:
    """Peak memory increase (MiB) while `step` runs: `torch.cuda.max_memory_allocated` on a GPU, the peak RSS on
    CPU (reset first, so that the peak of importing and building is not the one read)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {"mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20, "peak_reset": True}
    reset = reset_peak_rss()
    before = current_rss()
    step()
    return {"mib": (peak_rss() - before) / 2**20, "peak_reset": reset}


def memory_child(family_name: str, frames: int, ratio: float | None, settings: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak memory increase (MiB) of the first whole-model training step, baseline when
    `ratio` is None. Weights and kept units are those of the main process (same seed, same build order)."""
    torch.set_num_threads(settings["threads"])
    family = FAMILIES[family_name]
    torch.manual_seed(0)
    config = family.make_config(settings["size"])
    stts_config = STTSConfig(prune_ratio=ratio or 0.0, prune_layer=settings["prune_layer"], train_base_model=True)
    device, dtype = settings["device"], settings["dtype"]
    model = apply_stts(family.model(config, device, dtype, settings["attn_implementation"]), stts_config)
    model.train()
    step = train_step(model, family.batch(config, frames, settings["size"], answer=True, device=device, dtype=dtype))
    return step_peak_mib(bare(model, step) if ratio is None else step, settings["device"])


def fresh_process_context() -> Any:
    """A multiprocessing context whose processes start fresh: forkserver, whose server process has imported torch,
    transformers, stts_adapter and the model classes and nothing else, so a job does not pay those imports (~4 s)
    again (it still imports this module, which then finds them imported); spawn where there is no forkserver.

    Preloading "__main__" would be simpler, but Python 3.11's forkserver never receives the main path."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    models = sorted({family.model_class.__module__ for family in FAMILIES.values()})
    context.set_forkserver_preload(["torch", "transformers", "stts_adapter", "stts_adapter.testing", *models])
    return context


def measure_memory(jobs: list[tuple[str, int, float | None]], args: argparse.Namespace) -> dict[tuple, dict]:
    """Run every memory job in a fresh process of its own (max_tasks_per_child=1: a worker never serves two jobs).
    RSS does not depend on what else runs, so jobs run in parallel on the cores the timing used."""
    settings = {
        "threads": args.threads,
        "size": args.size,
        "prune_layer": args.prune_layer,
        "device": args.device,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
    }
    workers = 1 if args.device != "cpu" else max(1, min(len(jobs), (os.cpu_count() or 1) // args.threads))
    if args.memory_workers is not None:
        workers = args.memory_workers  # e.g. 1 when two of the largest steps would not fit in RAM together
    context = fresh_process_context()
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {job: pool.submit(memory_child, *job, settings) for job in jobs}
        return {job: future.result() for job, future in tqdm(futures.items(), desc="peak memory")}


def attach_memory(results: list[dict], memory: dict[tuple, dict]) -> None:
    """Add `peak_memory_mib` (baseline, STTS) to every result row whose two jobs ran."""
    for row in results:
        baseline = memory.get((row["family"], row["frames"], None))
        stts = memory.get((row["family"], row["frames"], row["prune_ratio"]))
        if baseline and stts:
            row["peak_memory_mib"] = {
                "baseline": baseline["mib"],
                "stts": stts["mib"],
                "peak_reset": stts["peak_reset"],
            }
