#!/usr/bin/env bash
# Start a twinpipe recipe on N local ranks with torchrun (one node).
#
#   launch/torchrun.sh 4 parallel.pp=4 parallel.schedule=dualpipe model=tiny train.steps=20
#   launch/torchrun.sh 4 --config-name sft parallel.pp=2 parallel.dp=2
#   NPROC=8 launch/torchrun.sh parallel.pp=4 parallel.dp=2 parallel.schedule=dualpipev
#
#   launch/torchrun.sh 4 generate checkpoint=runs/try1 parallel.pp=2 'prompts=[...]'   # twinpipe-generate
#   launch/torchrun.sh 4 eval checkpoint=runs/try1 parallel.pp=2 parallel.ep=2          # twinpipe-eval
#
# The first argument (when it is a number) or $NPROC is the rank count; then `generate` or `eval`
# picks that tool instead of training; the rest goes to `python -m twinpipe.trainer` (or
# twinpipe.trainer.cli.generate / .evaluate) unchanged (Hydra overrides, --config-name). N must equal
# parallel.pp x parallel.dp (the trainer checks it). Backend: NCCL with one rank per GPU when
# nvidia-smi sees at least N GPUs, else gloo on the CPU with the cores split between the ranks;
# an explicit parallel.backend=... among the overrides wins.
#
# MAX_RESTARTS=N (default 0): torchrun restarts the ranks up to N times after a failure (a rank the
# watchdog of parallel.timeout_s ended, a crash) and they continue from the newest complete checkpoint
# (resume=auto, the default). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 makes
# each attempt use a fresh TCPStore: with torch's shared one a restarted rank reads the previous
# attempt's addresses (trainer/watchdog.py says where in torch).
set -euo pipefail

if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  NPROC=$1
  shift
fi
NPROC=${NPROC:-1}
module=twinpipe.trainer
case "${1:-}" in
  generate) module=twinpipe.trainer.cli.generate; shift ;;
  eval) module=twinpipe.trainer.cli.evaluate; shift ;;
esac
if (( NPROC < 1 )); then
  echo "torchrun.sh: rank count $NPROC; need at least 1" >&2
  exit 2
fi

PYTHON=${PYTHON:-python}
if [[ -z "${VIRTUAL_ENV:-}" && -x "$(dirname "$0")/../.venv/bin/python" && $PYTHON == python ]]; then
  PYTHON="$(dirname "$0")/../.venv/bin/python"
fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
fi
if (( gpus >= NPROC )); then
  backend=nccl
else
  backend=gloo
  if (( gpus > 0 )); then
    echo "torchrun.sh: $NPROC ranks but $gpus GPU(s): running on the CPU with gloo" >&2
    export CUDA_VISIBLE_DEVICES=""
  fi
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

extra=()
if [[ " $* " != *" parallel.backend="* ]]; then
  extra+=("parallel.backend=$backend")
fi
MAX_RESTARTS=${MAX_RESTARTS:-0}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

export WANDB_MODE=${WANDB_MODE:-offline}
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" \
  --max-restarts "$MAX_RESTARTS" \
  -m "$module" "$@" "${extra[@]}"
