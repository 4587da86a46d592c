# shellcheck shell=bash
# Shared pieces of the Slurm recipes (dapo_qwen*.sh) and the local launcher (local.sh). Sourced, never run.
#
# Environment (each has a default; set it to override):
#   CONFIG             run config YAML                          (the recipe's example)
#   RUN_DIR            logging.dir: logs, TensorBoard, checkpoints, the plan (unset: the config's)
#   HF_MODEL DATA EVAL_DATA LOAD
#                      model.hf_path, data.train_path, eval.path, model.load (unset: the config's values)
#   MODEL_SHAPE        what the planner sizes: a named shape or a config.json (the recipe's model)
#   NODES              nodes (Slurm's allocation; dry runs outside Slurm use it)
#   GPUS_PER_NODE      GPUs per node (Slurm's allocation, else 8)
#   GPU_MEMORY_GIB     79.6 (an 80 GB H100 as nvidia-smi reports it)
#   ROLLOUT_PLACEMENT  colocated: SGLang shares the training GPUs | dedicated: on the last ROLLOUT_NODES nodes
#   ROLLOUT_NODES      nodes of dedicated rollout (the recipe's default)
#   MASTER_PORT        torchrun rendezvous port (derived from the job id)
#   SERVER_START_TIMEOUT_S  time SGLang servers may take to load (1800)
#   STALL_REQUEUES     times a job requeues itself after training stalled (trainer/watchdog.py) (3)
#   CHECKPOINT_GRACE_S time training may take to checkpoint after SIGTERM before torchrun kills it (540; torch
#                      releases that read TORCH_ELASTIC_SHUTDOWN_TIMEOUT; older ones allow 30 s)
#   DAPO_API_KEY       the rollout servers' API key (a new random one per job); never printed
#   DRY_RUN=1, or --dry-run as the first argument: print the resolved config and every command; start nothing.
# Arguments are config overrides (section.field=value), passed to the planner and to the trainer.

dapo_log() { printf '[dapo %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
dapo_die() {
	dapo_log "error: $*"
	exit 1
}

# Prints a command so that it can be pasted into a shell; words without special characters stay bare.
dapo_quote() {
	local word words=()
	for word in "$@"; do
		if [[ $word =~ ^[][A-Za-z0-9_./=:,@%+-]+$ ]]; then
			words+=("$word")
		elif [[ $word != *"'"* ]]; then
			words+=("'$word'")
		else
			words+=("$(printf '%q' "$word")")
		fi
	done
	echo "${words[*]}"
}

# ---- arguments, overrides, the plan ----------------------------------------------------------------------

dapo_parse_args() {
	DRY_RUN=${DRY_RUN:-0}
	if [[ ${1:-} == --dry-run ]]; then
		DRY_RUN=1
		shift
	fi
	USER_OVERRIDES=("$@")
}

# Overrides that carry the environment into the config; the user's come after them and win.
dapo_build_overrides() {
	OVERRIDES=("checkpoint.resume=true")
	if [[ -n ${RUN_DIR:-} ]]; then OVERRIDES+=("logging.dir=$RUN_DIR"); fi
	if [[ -n ${HF_MODEL:-} ]]; then OVERRIDES+=("model.hf_path=$HF_MODEL"); fi
	if [[ -n ${DATA:-} ]]; then OVERRIDES+=("data.train_path=$DATA"); fi
	if [[ -n ${EVAL_DATA:-} ]]; then OVERRIDES+=("eval.path=$EVAL_DATA"); fi
	if [[ -n ${LOAD:-} ]]; then OVERRIDES+=("model.load=$LOAD"); fi
	OVERRIDES+=("${USER_OVERRIDES[@]}")
}

# Runs the planner (its table goes to the log) and refuses to go on unless the run fits. The plan, with the
# resolved config, is left as JSON in PLAN_JSON. Arguments: the cluster's shape, as planner flags.
# Exit statuses of megatron_dapo.plan: 2 a config or model it cannot read, 3 a run that does not fit; anything
# else non-zero (a traceback's 1, a signal's 128+N) is a crash of the planner itself, never a verdict.
dapo_check_plan() {
	local model=() status=0 output
	if [[ -n ${MODEL_SHAPE:-} ]]; then model=(--model "$MODEL_SHAPE"); fi
	output=$(mktemp)
	python -m megatron_dapo.plan --config "$CONFIG" "${model[@]}" "$@" --save-json "$PLAN_JSON" \
		-- "${OVERRIDES[@]}" >"$output" 2>&1 || status=$?
	case $status in
	0 | 2 | 3) cat "$output" ;;
	*)
		dapo_log "the planner crashed (exit $status); its last lines:"
		tail -n 20 "$output" >&2
		;;
	esac
	rm -f "$output"
	case $status in
	0) ;;
	2) dapo_die "the planner could not read the config or the model (above); nothing was started" ;;
	3) dapo_die "the planner says this run cannot fit (above: what to change); nothing was started" ;;
	*) dapo_die "the planner crashed (exit $status), so nothing is known about the fit; nothing was started" ;;
	esac
}

# One value of the resolved config: dapo_config_value rollout.server_tp
dapo_config_value() {
	python - "$PLAN_JSON" "$1" <<'PY'
import json
import sys

value = json.load(open(sys.argv[1]))["config"]
for key in sys.argv[2].split("."):
    value = value[key]
print(json.dumps(value) if isinstance(value, bool | list | dict) else value)
PY
}

# The config the trainer will run with: CONFIG under OVERRIDES and the given extra overrides.
dapo_print_config() {
	echo "== resolved config =="
	python - "$CONFIG" "${OVERRIDES[@]}" "$@" <<'PY'
import sys

from megatron_dapo.config import load_config

print(load_config(sys.argv[1], sys.argv[2:]).to_yaml(), end="")
PY
}

# ---- signals and processes -------------------------------------------------------------------------------

# torchrun passes SIGTERM on to the training processes and gives them this long to save before it kills them.
dapo_export_signal_env() {
	: "${CHECKPOINT_GRACE_S:=540}"
	export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$CHECKPOINT_GRACE_S
}

# A signal for the job: remember it and pass it to training (as DAPO_FORWARD_AS when set), which checkpoints
# and exits.
dapo_on_signal() {
	DAPO_SIGNAL=$1
	dapo_log "received SIG$1: asking training to checkpoint and exit"
	if [[ -n ${DAPO_TRAIN_PID:-} ]]; then
		kill -s "${DAPO_FORWARD_AS:-$1}" "$DAPO_TRAIN_PID" 2>/dev/null || true
	fi
}

dapo_trap_signals() {
	DAPO_SIGNAL=
	DAPO_TRAIN_PID=
	trap 'dapo_on_signal USR1' USR1
	trap 'dapo_on_signal TERM' TERM
	trap 'dapo_on_signal INT' INT
}

# Waits for a process even when a trapped signal interrupts `wait` (bash returns from it at once then).
dapo_wait() {
	local pid=$1 status=0
	while :; do
		wait "$pid" && status=0 || status=$?
		kill -0 "$pid" 2>/dev/null || return "$status"
	done
}

# One API key per job for the rollout servers (SGLang's --api-key) and training's client, which reads it from
# the environment: exported, so srun and torchrun hand it to every step and rank. Never printed: commands name
# it as "$DAPO_API_KEY".
dapo_export_api_key() {
	if [[ -z ${DAPO_API_KEY:-} ]]; then
		DAPO_API_KEY=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
	fi
	export DAPO_API_KEY
}

# ---- Slurm -----------------------------------------------------------------------------------------------

dapo_slurm_defaults() {
	: "${NODES:=${SLURM_JOB_NUM_NODES:-1}}"
	: "${GPUS_PER_NODE:=${SLURM_GPUS_ON_NODE:-8}}"
	: "${GPU_MEMORY_GIB:=79.6}"
	: "${ROLLOUT_PLACEMENT:=colocated}"
	: "${SERVER_START_TIMEOUT_S:=1800}"
	: "${MASTER_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
	case $ROLLOUT_PLACEMENT in
	colocated) ROLLOUT_NODES=0 ;;
	dedicated)
		((ROLLOUT_NODES >= 1 && ROLLOUT_NODES < NODES)) ||
			dapo_die "ROLLOUT_NODES=$ROLLOUT_NODES must be in [1, NODES=$NODES) for ROLLOUT_PLACEMENT=dedicated"
		;;
	*) dapo_die "ROLLOUT_PLACEMENT=$ROLLOUT_PLACEMENT: choose colocated or dedicated" ;;
	esac
	[[ -f $CONFIG ]] || dapo_die "CONFIG=$CONFIG does not exist (submit from the repository root, or set CONFIG)"
}

# The allocation's nodes: training on the first NODES - ROLLOUT_NODES, dedicated SGLang servers on the rest.
dapo_slurm_hosts() {
	local hosts
	if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
		mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
		((${#hosts[@]} == NODES)) || dapo_die "NODES=$NODES but the allocation has ${#hosts[@]} node(s)"
	elif ((DRY_RUN)); then
		mapfile -t hosts < <(for ((i = 1; i <= NODES; i++)); do printf 'node%03d\n' "$i"; done)
		dapo_log "dry run outside Slurm: the nodes are called ${hosts[0]}..${hosts[-1]}"
	else
		dapo_die "no Slurm allocation (SLURM_JOB_NODELIST is unset): submit with sbatch, or set DRY_RUN=1"
	fi
	TRAIN_HOSTS=("${hosts[@]:0:NODES-ROLLOUT_NODES}")
	if ((ROLLOUT_NODES)); then
		ROLLOUT_HOSTS=("${hosts[@]:NODES-ROLLOUT_NODES}")
	else
		ROLLOUT_HOSTS=("${TRAIN_HOSTS[@]}")
	fi
	MASTER_ADDR=${TRAIN_HOSTS[0]}
}

# One SGLang server per rollout.server_tp GPUs of each rollout node, as "host port first-gpu".
dapo_plan_servers() {
	SERVER_TP=$(dapo_config_value rollout.server_tp)
	MEM_FRACTION=$(dapo_config_value rollout.mem_fraction)
	BASE_PORT=$(dapo_config_value rollout.base_port)
	MODEL_PATH=$(dapo_config_value model.hf_path)
	SERVERS=()
	SERVER_URLS=()
	local host gpu
	for host in "${ROLLOUT_HOSTS[@]}"; do
		for ((gpu = 0; gpu < GPUS_PER_NODE; gpu += SERVER_TP)); do
			SERVERS+=("$host $((BASE_PORT + gpu / SERVER_TP)) $gpu")
			SERVER_URLS+=("http://$host:$((BASE_PORT + gpu / SERVER_TP))")
		done
	done
}

dapo_server_urls_override() { echo "rollout.server_urls=[$(IFS=, && echo "${SERVER_URLS[*]}")]"; }

# The command one node runs for one server (NODE_CMD) and the srun step that starts it (STEP_CMD).
# Servers bind to their node's name: training processes on other nodes reach them there, with the job's API
# key. The key reaches the server through the environment, and its flag is added on the node, so that
# neither the srun command line nor Slurm's record of it holds the key.
dapo_server_step() {
	local host=$1 port=$2 gpu=$3
	# shellcheck disable=SC2016  # "$@" and "$DAPO_API_KEY" are expanded by the inner bash
	NODE_CMD=(bash -c 'exec "$@" --api-key "$DAPO_API_KEY"' sglang-with-api-key
		python -m sglang.launch_server --model-path "$MODEL_PATH" --host "$host" --port "$port"
		--tp-size "$SERVER_TP" --mem-fraction-static "$MEM_FRACTION" --base-gpu-id "$gpu")
	# Colocated servers hand their memory to training between rollouts (release/resume_memory_occupation).
	if ((ROLLOUT_NODES == 0)); then NODE_CMD+=(--enable-memory-saver); fi
	# --overlap: colocated servers and training share the nodes' GPUs.
	STEP_CMD=(srun --overlap --nodes=1 --ntasks-per-node=1 --nodelist="$host" --gpus-per-node="$GPUS_PER_NODE"
		--kill-on-bad-exit=0 --output="$RUN_DIR/logs/sglang-$host-$port.log" "${NODE_CMD[@]}")
}

# The command each training node runs (NODE_CMD: torchrun, rendezvous on the first training node), its step.
# srun hands a signal to every process of the step, the training processes included. torchrun would die of
# SIGUSR1 (no release handles it by default), so it starts with SIGUSR1 ignored and leaves the workers, which
# catch it, to checkpoint and exit; torchrun then ends with them.
dapo_train_step() {
	# shellcheck disable=SC2016  # "$@" is expanded by the inner bash
	NODE_CMD=(bash -c 'trap "" USR1 && exec "$@"' torchrun-ignoring-usr1
		torchrun --nnodes="${#TRAIN_HOSTS[@]}" --nproc-per-node="$GPUS_PER_NODE"
		--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-dapo}"
		-m megatron_dapo.train --config "$CONFIG" "${OVERRIDES[@]}" "$(dapo_server_urls_override)")
	STEP_CMD=(srun --overlap --nodes="${#TRAIN_HOSTS[@]}" --ntasks-per-node=1
		--nodelist="$(IFS=, && echo "${TRAIN_HOSTS[*]}")" --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1
		"${NODE_CMD[@]}")
}

dapo_print_commands() {
	local server host port gpu lines=()
	echo "== commands the batch script runs =="
	for server in "${SERVERS[@]}"; do
		read -r host port gpu <<<"$server"
		dapo_server_step "$host" "$port" "$gpu"
		echo "$(dapo_quote "${STEP_CMD[@]}") &"
		lines+=("$host: $(dapo_quote "${NODE_CMD[@]}")")
	done
	dapo_train_step
	dapo_quote "${STEP_CMD[@]}"
	echo
	for host in "${TRAIN_HOSTS[@]}"; do
		lines+=("$host: $(dapo_quote env "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$CHECKPOINT_GRACE_S" "${NODE_CMD[@]}")")
	done
	echo "== commands each node runs =="
	printf '%s\n' "${lines[@]}"
}

dapo_start_servers() {
	local server host port gpu
	for server in "${SERVERS[@]}"; do
		read -r host port gpu <<<"$server"
		dapo_server_step "$host" "$port" "$gpu"
		dapo_log "starting SGLang on $host:$port (GPUs $gpu..$((gpu + SERVER_TP - 1)))"
		"${STEP_CMD[@]}" &
		DAPO_SERVER_PIDS+=("$!")
	done
}

# On exit: stop the SGLang servers this script started, by the PIDs it recorded, and drop the temporary plan.
dapo_cleanup() {
	local pid
	for pid in "${DAPO_SERVER_PIDS[@]}"; do kill -s TERM "$pid" 2>/dev/null || true; done
	for pid in "${DAPO_SERVER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -f "$PLAN_JSON"
}

# Polls every server's /health until all answer; fails when one exits or the timeout passes, returns 1 when
# the job is signalled meanwhile.
dapo_wait_servers() {
	local deadline=$((SECONDS + SERVER_START_TIMEOUT_S)) i pending
	while :; do
		pending=0
		for i in "${!SERVER_URLS[@]}"; do
			kill -0 "${DAPO_SERVER_PIDS[i]}" 2>/dev/null ||
				dapo_die "SGLang server ${SERVER_URLS[i]} exited while loading: see $RUN_DIR/logs/"
			curl -sf -o /dev/null "${SERVER_URLS[i]}/health" || pending=$((pending + 1))
		done
		((pending == 0)) && return 0
		[[ -z $DAPO_SIGNAL ]] || return 1
		((SECONDS < deadline)) || dapo_die "$pending SGLang server(s) not ready after ${SERVER_START_TIMEOUT_S}s"
		sleep "${DAPO_POLL_S:-10}"
	done
}

# Training stalled (trainer/watchdog.py) when it failed after writing stacks to $RUN_DIR/logs/watchdog/:
# torchrun reports the watchdog's exit (75) as a plain failure, so the files tell a stall from a crash.
dapo_stalled() {
	[[ -n $(find "$RUN_DIR/logs/watchdog" -name 'stacks-rank*.txt' -newer "$DAPO_TRAIN_STARTED" 2>/dev/null) ]]
}

# Puts the job back in the queue when the time limit is near (SIGUSR1 from --signal=B:USR1@N: training has
# checkpointed) or training stalled, at most STALL_REQUEUES times a job (3): a stall that keeps recurring is a
# bug to read the stacks of, not to retry. The next start resumes from the latest complete checkpoint.
dapo_requeue_if_needed() {
	local status=$1 reason count count_file
	[[ -n ${SLURM_JOB_ID:-} ]] || return 0
	if [[ $DAPO_SIGNAL == USR1 ]]; then
		reason="the time limit is near"
	elif ((status)) && dapo_stalled; then
		count_file="$RUN_DIR/logs/watchdog/stall-requeues-$SLURM_JOB_ID"
		count=$(($(cat "$count_file" 2>/dev/null || echo 0) + 1))
		if ((count > ${STALL_REQUEUES:-3})); then
			dapo_log "training stalled again: not requeueing after ${STALL_REQUEUES:-3} stalls; read the" \
				"stacks in $RUN_DIR/logs/watchdog/"
			return 0
		fi
		echo "$count" >"$count_file"
		reason="training stalled, stacks in $RUN_DIR/logs/watchdog/; stall $count of ${STALL_REQUEUES:-3}"
	else
		return 0
	fi
	dapo_log "requeueing job $SLURM_JOB_ID ($reason): it resumes from the latest checkpoint under $RUN_DIR"
	scontrol requeue "$SLURM_JOB_ID"
}

dapo_slurm_main() {
	dapo_parse_args "$@"
	dapo_slurm_defaults
	dapo_export_signal_env
	dapo_slurm_hosts
	dapo_export_api_key
	dapo_build_overrides
	# The placement decides rollout.colocate, whatever the config says.
	if ((ROLLOUT_NODES)); then OVERRIDES+=(rollout.colocate=false); else OVERRIDES+=(rollout.colocate=true); fi
	DAPO_SERVER_PIDS=()
	PLAN_JSON=$(mktemp)
	trap dapo_cleanup EXIT
	dapo_check_plan --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --gpu-memory-gib "$GPU_MEMORY_GIB" \
		--rollout-nodes "$ROLLOUT_NODES"
	RUN_DIR=$(dapo_config_value logging.dir)
	dapo_plan_servers
	if ((DRY_RUN)); then
		dapo_print_config "$(dapo_server_urls_override)"
		dapo_print_commands
		return 0
	fi
	mkdir -p "$RUN_DIR/logs"
	cp "$PLAN_JSON" "$RUN_DIR/plan.json"
	dapo_trap_signals
	dapo_start_servers
	local status=0
	if dapo_wait_servers; then
		dapo_train_step
		DAPO_TRAIN_STARTED="$RUN_DIR/logs/.train-started"
		touch "$DAPO_TRAIN_STARTED"
		dapo_log "starting training on ${#TRAIN_HOSTS[@]} node(s), rendezvous at $MASTER_ADDR:$MASTER_PORT"
		"${STEP_CMD[@]}" &
		DAPO_TRAIN_PID=$!
		dapo_wait "$DAPO_TRAIN_PID" || status=$?
	fi
	dapo_requeue_if_needed "$status"
	return "$status"
}

# ---- one machine -----------------------------------------------------------------------------------------

# GPUS (NPROC) and GPU memory of this machine; on a CPU-only machine, NPROC processes share the host memory.
dapo_local_machine() {
	if command -v nvidia-smi >/dev/null; then
		KERNELS=te
		: "${NPROC:=$(nvidia-smi --list-gpus | wc -l)}"
		: "${GPU_MEMORY_GIB:=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits |
			awk 'NR == 1 {printf "%.1f", $1 / 1024}')}"
	else
		KERNELS=local
		: "${NPROC:=1}"
		: "${GPU_MEMORY_GIB:=$(awk -v n="$NPROC" '/^MemTotal/ {printf "%.1f", $2 / 1048576 / n}' /proc/meminfo)}"
	fi
}

dapo_local_main() {
	dapo_parse_args "$@"
	: "${CONFIG:=examples/demo_cpu.yaml}"
	[[ -f $CONFIG ]] || dapo_die "CONFIG=$CONFIG does not exist (set CONFIG=path/to/config.yaml)"
	dapo_local_machine
	dapo_export_signal_env
	dapo_export_api_key
	dapo_build_overrides
	DAPO_SERVER_PIDS=()
	PLAN_JSON=$(mktemp)
	trap dapo_cleanup EXIT
	dapo_check_plan --nodes 1 --gpus-per-node "$NPROC" --gpu-memory-gib "$GPU_MEMORY_GIB" --kernels "$KERNELS"
	# The trainer starts its own rollout servers (rollout.server_urls is empty).
	local command=(torchrun --standalone --nproc-per-node="$NPROC" -m megatron_dapo.train --config "$CONFIG"
		"${OVERRIDES[@]}")
	if ((DRY_RUN)); then
		dapo_print_config
		echo "== command =="
		dapo_quote "${command[@]}"
		echo
		return 0
	fi
	# Off Slurm only torchrun can reach its workers (each runs in a session of its own), and every torchrun
	# release passes SIGTERM on: any signal becomes SIGTERM. torchrun gets a process group of its own, so a
	# Ctrl-C reaches it once, through the trap.
	dapo_trap_signals
	DAPO_FORWARD_AS=TERM
	set -m
	"${command[@]}" &
	DAPO_TRAIN_PID=$!
	set +m
	dapo_wait "$DAPO_TRAIN_PID"
}
