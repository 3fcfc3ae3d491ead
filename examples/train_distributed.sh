#!/usr/bin/env bash
# LoRA + STTS with transformers.Trainer on several processes: the same script as for one process
# (examples/train_with_trainer.py), launched by torchrun or by accelerate launch. DDP keeps the scorer and LoRA
# identical on every process; only the main process writes the adapters.
#
#   examples/train_distributed.sh                      # torchrun, 2 processes, the small random model
#   examples/train_distributed.sh accelerate           # accelerate launch, 2 processes
#   NPROC=4 examples/train_distributed.sh torchrun --size tiny --max-steps 10 --output-dir out
#
# Every argument after the launcher goes to train_with_trainer.py (see its --help). On CPU the processes talk over
# gloo; on GPUs over NCCL, one GPU per process. Each process prints the checksum of its scorer and LoRA weights: they
# are the same on every process.
set -euo pipefail

launcher="${1:-torchrun}"
if [ $# -gt 0 ]; then shift; fi
nproc="${NPROC:-2}"
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/train_with_trainer.py"

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"                  # everything is local
export HF_HUB_DISABLE_TELEMETRY="${HF_HUB_DISABLE_TELEMETRY:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"                # one thread per process on CPU

case "$launcher" in
  torchrun)
    exec torchrun --standalone --nproc_per_node "$nproc" "$script" "$@"
    ;;
  accelerate)
    # --multi_gpu selects DDP (gloo on a machine without GPUs); the port must be free.
    exec accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1 --mixed_precision no \
      --dynamo_backend no --main_process_port "${MAIN_PROCESS_PORT:-29500}" "$script" "$@"
    ;;
  *)
    echo "usage: $0 [torchrun|accelerate] [train_with_trainer.py arguments...]" >&2
    exit 2
    ;;
esac
