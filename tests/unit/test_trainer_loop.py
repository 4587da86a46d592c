"""The loop: how a step's updates are reported (skipped, non-finite updates counted and left out of the
averages; token metrics pooled), and, over fake roles, the order of a step, the evaluation and save cadence,
the stop signal and resuming."""

import math
from types import SimpleNamespace

import pytest

from megatron_dapo.config import from_dict
from megatron_dapo.trainer.loop import Trainer
from megatron_dapo.trainer.policy.role import update_metrics as _update_metrics
from megatron_dapo.trainer.policy.train_step import StepResult


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


def loop_config(**sections):
    cadence = {"train": {"steps": 5}, "eval": {"every_steps": 2}, "checkpoint": {"save_every_steps": 2}}
    return from_dict({**cadence, **sections})


def test_each_step_runs_the_paper_order_and_logs_once():
    trainer = LoopWithFakes(loop_config())
    trainer.fit()
    # The servers must hold the weights of the last sync (version 1) before step 2 generates.
    assert trainer.calls[trainer.calls.index(("generate", 2)) - 1] == ("check_servers", 1)
    step_two = trainer.calls[trainer.calls.index(("generate", 2)) :][:9]
    assert [c[0] for c in step_two] == [
        "generate", "release", "shard", "distribute", "train", "publish", "evaluate", "log", "save",
    ]  # fmt: skip
    assert step_two[2:5] == [
        ("shard", "batch2"),
        ("distribute", ["share of batch2"]),
        ("train", "share of batch2"),
    ]
    assert step_two[5] == ("publish", 2)  # the weights the engine samples step 3 with are version 2
    logged = step_two[7][2]
    assert (
        logged["rollout"] == {"s": 2}
        and logged["train"] == {"loss": 1.0}
        and logged["eval"] == {"avg@1": 0.5}
    )
    assert logged["weight_sync"] == {"gigabytes": 1.0} and logged["timing"]["weight_sync_s"] == 0.5


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
