# shellcheck shell=bash
# The models the recipes train, sourced by them: which planner shape sizes each, which example config runs it,
# how many nodes it takes (the recipe's #SBATCH --nodes, for dry runs outside Slurm) and how many of them a
# dedicated rollout takes. The shapes' numbers are the models' config.json values, kept in
# megatron_dapo/plan/shape.py (NAMED_MODELS); the parallel layout lives in the example config.

dapo_model_defaults() {
	case $1 in
	qwen2.5-7b)
		: "${CONFIG:=examples/dapo_qwen7b.yaml}"
		: "${NODES:=${SLURM_JOB_NUM_NODES:-4}}"
		: "${ROLLOUT_NODES:=1}"
		;;
	qwen2.5-32b)
		: "${CONFIG:=examples/dapo_qwen32b.yaml}"
		: "${NODES:=${SLURM_JOB_NUM_NODES:-16}}"
		: "${ROLLOUT_NODES:=4}"
		;;
	*)
		echo "dapo_model_defaults: unknown model $1 (known: qwen2.5-7b, qwen2.5-32b)" >&2
		return 1
		;;
	esac
	: "${MODEL_SHAPE:=$1}"
}
