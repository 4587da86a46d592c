"""The loop: how a step's updates are reported (skipped, non-finite updates counted and left out of the
averages; token metrics pooled), and, over fake roles, the order of a step, the evaluation and save cadence,
the stop signal and resuming."""

import contextlib
import math
import random
from types import SimpleNamespace

import pytest

from megatron_dapo.config import from_dict
from megatron_dapo.trainer import loop
from megatron_dapo.trainer.loop import Trainer
from megatron_dapo.trainer.policy import role as policy_role
from megatron_dapo.trainer.policy.role import PolicyRole
from megatron_dapo.trainer.policy.role import update_metrics as _update_metrics
from megatron_dapo.trainer.policy.train_step import StepResult
from megatron_dapo.trainer.watchdog import read_heartbeat, watchdog_for


def result(applied: bool, loss: float, grad_norm: float, tokens: float, entropy_sum: float) -> StepResult:
    sums = {"tokens": tokens, "entropy_sum": entropy_sum, "clip_upper_tokens": 1.0, "clip_lower_tokens": 0.0}
    return StepResult(applied=applied, loss=loss, grad_norm=grad_norm, metrics=sums)


def test_skipped_updates_are_counted_and_left_out():
    results = [
        result(True, 0.5, 2.0, tokens=10, entropy_sum=3.0),
        result(False, math.nan, math.inf, tokens=5, entropy_sum=math.nan),
        result(True, 1.5, 4.0, tokens=30, entropy_sum=5.0),
    ]
    metrics = _update_metrics(results, lr=1e-4)
    assert metrics["updates"] == 3 and metrics["updates_skipped"] == 1
    assert metrics["loss"] == pytest.approx(1.0) and metrics["grad_norm"] == pytest.approx(3.0)
    assert metrics["entropy"] == pytest.approx(8.0 / 40)  # pooled over tokens, not averaged per update
    assert metrics["clip_fraction_upper"] == pytest.approx(2 / 40)
    assert metrics["lr"] == 1e-4


def test_a_step_whose_updates_were_all_skipped_reports_nan_not_zero():
    metrics = _update_metrics([result(False, math.inf, math.nan, tokens=5, entropy_sum=1.0)], lr=1e-4)
    assert metrics["updates_skipped"] == 1
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    assert "entropy" not in metrics


# ---- the loop with fake roles: step order, evaluation and save cadence, stop signal, resume ----------------


class _Report:
    seconds = 0.5

    def metrics(self, prefix: str) -> dict[str, float]:
        return {"gigabytes": 1.0}


class _Stop:
    def __init__(self, stop_after: int | None, trainer: "LoopWithFakes") -> None:
        self.stop_after, self.trainer, self.received = stop_after, trainer, None

    def requested(self) -> bool:
        return self.trainer.step == self.stop_after


class LoopWithFakes(Trainer):
    """The real loop (fit, generate, sync_weights, evaluate, save) over fake roles that record each call."""

    def __init__(self, cfg, *, resumed_step: int = 0, stop_after: int | None = None) -> None:
        self.calls: list[tuple] = []
        self.resumed_step, self.stop_after = resumed_step, stop_after
        super().__init__(cfg)

    def _setup(self) -> None:
        calls = self.calls
        rollout = SimpleNamespace(
            check_servers=lambda version: calls.append(("check_servers", version)),
            generate=lambda step: (
                calls.append(("generate", step)) or (f"batch{step}", {"rollout": {"s": step}})
            ),
            evaluate=lambda: calls.append(("evaluate", self.step)) or {"eval": {"avg@1": 0.5}},
            state_dict=lambda: {"loader": {"step": self.step}, "sampler": {}},
            pause=lambda: calls.append(("pause",)),
            resume=lambda version: calls.append(("resume", version)),
        )
        policy = SimpleNamespace(
            model="model",
            shard=lambda batch: calls.append(("shard", batch)) or [f"share of {batch}"],
            train=lambda share: calls.append(("train", share)) or {"train": {"loss": 1.0}},
            save=lambda root, step, state: calls.append(("save", step, state["loader"]["step"])) or root,
        )
        publisher = SimpleNamespace(
            release_engine_memory=lambda: calls.append(("release",)),
            publish=lambda model, hf, version: calls.append(("publish", version)) or _Report(),
        )
        tracker = SimpleNamespace(log=lambda step, metrics: calls.append(("log", step, dict(metrics))))
        self.rollout, self.policy, self.publisher, self.tracker = rollout, policy, publisher, tracker
        self.distribute = lambda shares: calls.append(("distribute", shares)) or shares[0]
        self.hf_config, self.checkpoint_root = {}, "ckpt"
        self.step = self.resumed_step
        self.stop = _Stop(self.stop_after, self)
        self.watchdog = watchdog_for(self.cfg, rank=0, world_size=1)
        self._closing.callback(self.watchdog.close)


@pytest.fixture(autouse=True)
def _run_dir_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logging.dir is relative: the watchdog's heartbeats land here


def loop_config(**sections):
    cadence = {"train": {"steps": 5}, "eval": {"every_steps": 2}, "checkpoint": {"save_every_steps": 2}}
    return from_dict({**cadence, **sections})


def test_each_step_runs_the_paper_order_and_logs_once():
    trainer = LoopWithFakes(loop_config())
    trainer.fit()
    # The servers must hold the weights of the last sync (version 1) before step 2 generates.
    assert trainer.calls[trainer.calls.index(("generate", 2)) - 1] == ("check_servers", 1)
    step_two = trainer.calls[trainer.calls.index(("generate", 2)) :][:10]
    assert [c[0] for c in step_two] == [
        "generate", "release", "shard", "distribute", "train", "publish", "resume", "evaluate", "log", "save",
    ]  # fmt: skip
    assert step_two[2:5] == [
        ("shard", "batch2"),
        ("distribute", ["share of batch2"]),
        ("train", "share of batch2"),
    ]
    assert step_two[5:7] == [("publish", 2), ("resume", 2)]  # step 3 samples from version 2
    logged = step_two[8][2]
    assert (
        logged["rollout"] == {"s": 2}
        and logged["train"] == {"loss": 1.0}
        and logged["eval"] == {"avg@1": 0.5}
    )
    assert logged["weight_sync"] == {"gigabytes": 1.0} and logged["timing"]["weight_sync_s"] == 0.5


def test_overlapped_generation_pauses_around_each_weight_update(monkeypatch):
    barriers = []
    monkeypatch.setattr(loop.dist, "barrier", lambda: barriers.append(1))
    trainer = LoopWithFakes(loop_config(rollout={"max_staleness": 1, "colocate": False}))
    trainer.fit()
    names = [c[0] for c in trainer.calls]
    publishes = [i for i, name in enumerate(names) if name == "publish"]
    assert len(publishes) == 5 and len(barriers) == 5  # every rank waits while rank 0 pauses
    assert all(names[i - 1] == "pause" and names[i + 1] == "resume" for i in publishes)


def test_evaluation_and_saves_follow_their_cadence_and_the_last_step():
    trainer = LoopWithFakes(loop_config())
    trainer.fit()
    assert [c[1] for c in trainer.calls if c[0] == "evaluate"] == [0, 2, 4, 5]  # 0: before any update
    assert [c[1] for c in trainer.calls if c[0] == "save"] == [2, 4, 5]
    assert [c[1] for c in trainer.calls if c[0] == "generate"] == [1, 2, 3, 4, 5]
    assert trainer.calls[0] == ("evaluate", 0) and trainer.calls[1][:2] == ("log", 0)


def test_a_stop_signal_saves_the_step_and_ends_the_loop():
    trainer = LoopWithFakes(loop_config(checkpoint={"save_every_steps": 0}), stop_after=3)
    trainer.fit()
    assert [c[1] for c in trainer.calls if c[0] == "generate"] == [1, 2, 3]
    saves = [c for c in trainer.calls if c[0] == "save"]
    assert saves == [("save", 3, 3)]  # with the rollout role's state of that same step
    assert trainer.calls[-1][:2] == ("log", 3) and "save_s" in trainer.calls[-1][2]["timing"]


def test_a_resumed_run_continues_after_its_step_without_a_new_baseline():
    trainer = LoopWithFakes(loop_config(), resumed_step=3)
    trainer.fit()
    assert [c[1] for c in trainer.calls if c[0] == "generate"] == [4, 5]
    assert [c[1] for c in trainer.calls if c[0] == "evaluate"] == [4, 5]


def test_each_phase_of_a_step_runs_under_the_watchdog():
    trainer = LoopWithFakes(loop_config())
    heartbeat = trainer.watchdog.heartbeat_path(0)
    seen = []

    def spy(role: SimpleNamespace, name: str) -> None:
        """The phase the heartbeat names while the role's `name` runs."""
        call = getattr(role, name)
        setattr(
            role, name, lambda *args: seen.append((name, read_heartbeat(heartbeat).where())) or call(*args)
        )

    for role, name in [
        (trainer.rollout, "generate"),
        (trainer.publisher, "publish"),
        (trainer.rollout, "evaluate"),
        (trainer.policy, "save"),
    ]:
        spy(role, name)
    with trainer:
        trainer.fit()
    assert [s for s in seen if s[1].endswith("of step 2")] == [
        ("generate", "rollout of step 2"),
        ("publish", "weight_sync of step 2"),
        ("evaluate", "eval of step 2"),
        ("save", "save of step 2"),
    ]
    assert read_heartbeat(heartbeat).where() == "between phases of step 5"


def test_the_policy_role_runs_old_logprobs_and_each_update_as_a_phase(monkeypatch):
    """PolicyRole.train's own phases, through its hook, over a fake policy: which work runs inside which."""
    updates = random.randint(2, 5)
    events: list[tuple] = []

    @contextlib.contextmanager
    def watch(phase: str, part: str):
        events.append(("enter", phase, part))
        yield
        events.append(("leave", phase, part))

    def forward(model, microbatches, distribution, pg):
        events.append(("forward", microbatches[0]))
        return [(f"logprobs {microbatches[0]}", None)]

    def step(model, optimizer, microbatches, objective, distribution, pg):
        events.append(("train_step", microbatches[0]))
        done = result(True, 0.5, 1.0, tokens=10, entropy_sum=2.0)
        done.metrics["ratio_dev_max"] = 0.0
        return done

    monkeypatch.setattr(policy_role, "forward_logprobs", forward)
    monkeypatch.setattr(policy_role, "train_step", step)
    role = PolicyRole.__new__(PolicyRole)  # no Megatron model: the phases are what this test is about
    optimizer = SimpleNamespace(param_groups=[{"lr": 1e-6}])
    role.policy = SimpleNamespace(scheduler=SimpleNamespace(step=lambda n: None), optimizer=optimizer)
    role.policy.ddp = role.policy.distribution = role.pg = None
    role.pad_multiple, role.watch = 1, watch
    role._objective = lambda batch, microbatches, old, weights: None
    role._mismatch = lambda batch, old: events.append(("mismatch",)) or {}  # collective: pi_old's phase
    # collective too, and formed from pi_old before any update
    role._importance_weights = lambda batch, old: events.append(("importance",)) or ([None] * len(old), {})
    minibatches = [[SimpleNamespace(sample_ids=[m])] for m in range(updates)]
    share = SimpleNamespace(data=None, microbatches=lambda pad: minibatches)
    metrics = role.train(share)
    assert metrics["train"]["updates"] == updates
    old_logprobs = [("forward", minibatch[0]) for minibatch in minibatches]  # every pi_old before any update
    assert events[: updates + 4] == [
        ("enter", "old_logprobs", ""),
        *old_logprobs,
        ("mismatch",),
        ("importance",),
        ("leave", "old_logprobs", ""),
    ]
    for update, minibatch in enumerate(minibatches, 1):
        part = f"{update}/{updates}"
        at = events.index(("enter", "update", part))
        assert events[at : at + 3] == [events[at], ("train_step", minibatch[0]), ("leave", "update", part)]
