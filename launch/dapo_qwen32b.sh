#!/usr/bin/env bash
# The DAPO paper's run: Qwen2.5-32B base, DAPO-Math-17k, AIME 2024 avg@32 (examples/dapo_qwen32b.yaml).
#
#   sbatch launch/dapo_qwen32b.sh [section.field=value ...]       from the repository root
#   DRY_RUN=1 bash launch/dapo_qwen32b.sh                        print the plan and every command, run nothing
#   ROLLOUT_PLACEMENT=dedicated sbatch --nodes=20 launch/dapo_qwen32b.sh    SGLang on 4 extra nodes
#
# Near the time limit Slurm sends SIGUSR1 (--signal); training checkpoints, the job requeues itself and
# resumes from that checkpoint. Environment variables: launch/common.sh.
#SBATCH --job-name=dapo-qwen32b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repository from where it was submitted.
REPO_DIR=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$REPO_DIR"
source launch/common.sh
source launch/models.sh
dapo_model_defaults qwen2.5-32b
dapo_slurm_main "$@"
