#!/usr/bin/env bash
# One machine, the same code path as the Slurm recipes: plan first, then torchrun --standalone; the trainer
# starts its own rollout servers (SGLang on GPUs, the CPU engine with rollout.backend=cpu).
#
#   bash launch/local.sh [--dry-run] [section.field=value ...]
#   CONFIG=examples/dapo_qwen7b.yaml MODEL_SHAPE=qwen2.5-7b bash launch/local.sh     one GPU node
#
# NPROC: processes (default: the GPUs, or 1 without any). SIGINT/SIGTERM/SIGUSR1 make training checkpoint and
# exit. Environment variables: launch/common.sh.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
source launch/common.sh
dapo_local_main "$@"
