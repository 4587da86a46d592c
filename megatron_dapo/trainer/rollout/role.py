"""The rollout role: on global rank 0, the prompt stream, the rollout engine, streaming dynamic sampling,
scoring and evaluation. It produces each step's batch and hands it over as a StepBatch; it knows nothing of
Megatron. Data loads first, so that a bad row is reported before a model is built or a server started."""

import contextlib
import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from megatron_dapo.algo import DynamicSampler
from megatron_dapo.config import DapoConfig
from megatron_dapo.data.dataset import PromptLoader
from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.eval import evaluate
from megatron_dapo.rollout.engine import EngineUnavailableError
from megatron_dapo.rollout.failover import check_servers
from megatron_dapo.rollout.types import SamplingParams
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.data import load_eval_prompts, load_train_prompts, skip_settings
from megatron_dapo.trainer.rollout.collector import RewardSettings, RolloutCollector, RolloutSettings
from megatron_dapo.trainer.rollout.engine import EngineConnection

logger = logging.getLogger("megatron_dapo.train")

Metrics = dict[str, dict[str, float]]  # group ("rollout", "sampling", ...) -> name -> value


class RolloutRole:
    """Builds the step's batch from the prompt stream through the engine; evaluates the current policy."""

    def __init__(self, cfg: DapoConfig) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(Path(cfg.data.tokenizer_path or cfg.model.hf_path))
        # The loader's state (the checkpoint's `loader`) holds the skip_saturated memory too.
        self.loader = PromptLoader(
            load_train_prompts(cfg, self.tokenizer),
            seed=cfg.train.seed,
            shuffle=cfg.data.shuffle,
            skip=skip_settings(cfg),
        )
        self.eval_prompts = load_eval_prompts(cfg, self.tokenizer)
        eos = self.tokenizer.eos_token_id
        self.stop_token_ids = (eos,) if eos is not None else ()
        self.sampler = DynamicSampler(
            cfg.train.prompts_per_step,
            enabled=cfg.algorithm.dynamic_sampling,
            max_rounds=cfg.algorithm.max_sampling_rounds,
        )
        self.engine: EngineConnection | None = None
        # rollout.max_staleness > 0: the next step's collection, running while the policy trains
        self._ahead: tuple[int, Future] | None = None
        self._restored: dict[str, Any] = {}  # the checkpoint's collector state, for the collector to come
        self._failures_logged = 0  # the client's count of servers taken out of dispatch, as last logged
        self._restarts = 0  # since the last step's metrics
        self._closing = contextlib.ExitStack()

    def start_engine(self, log_dir: Path) -> EngineConnection:
        """Connect to rollout.server_urls, or launch the servers (stopped by `close`)."""
        r = self.cfg.rollout
        self.engine = EngineConnection.start(
            r, model_path=self.cfg.model.hf_path, log_dir=log_dir, seed=self.cfg.train.seed
        )
        self._closing.callback(self.engine.close)
        settings = rollout_settings(self.cfg, self.stop_token_ids)
        self.collector = RolloutCollector(
            self.engine.client, self.loader, self.sampler, self.tokenizer, settings
        )
        self.collector.load_state_dict(self._restored.get("collector", {}))
        if (ahead := self._restored.get("ahead")) is not None:
            self._ahead = (ahead["step"], _done(ahead["groups"], ahead["metrics"]))
        return self.engine

    def check_servers(self, version: int) -> None:
        """Before a step: only servers that answer /health and hold weight `version` take its requests;
        those launched here that failed restart, and return after the next sync (rollout/failover.py)."""
        client = self.engine.client
        check = self.engine.run(check_servers(client, self.engine.pool, version))
        self._restarts += len(check.restarted)
        if not check.ready:
            raise EngineUnavailableError(
                ",".join(client.server_urls),
                f"no rollout server holds weight version {version} and answers /health (failed: "
                f"{check.failed}, restarted: {check.restarted}, stale: {check.stale}); restarted servers "
                "get the weights at the next sync, so a run survives a server failure only with "
                "rollout.num_servers >= 2; see the server logs in the run's logs/",
            )

    @property
    def overlapped(self) -> bool:
        """Whether generation runs ahead of training (rollout.max_staleness > 0)."""
        return self.cfg.rollout.max_staleness > 0

    def generate(self, step: int) -> tuple[StepBatch, Metrics]:
        """The step's groups (G samples per prompt, rewarded, 0 < #correct < G under dynamic sampling) as
        samples with group-normalised advantages, and the rollout metrics. Overlapped, the batch was being
        collected while the previous step trained, and the next one's collection starts before returning."""
        started = time.perf_counter()
        if self._ahead is None:
            groups, metrics = self.engine.run(self.collector.collect(step))
        elif self._ahead[0] == step:
            groups, metrics = self._ahead[1].result()
        else:
            raise RuntimeError(f"step {step} asked for while step {self._ahead[0]} is being collected")
        self._ahead = None
        waited = time.perf_counter() - started
        if self.overlapped:
            self._ahead = (step + 1, self.engine.submit(self.collector.collect(step + 1)))
        metrics.setdefault("timing", {})["wait_rollout_s"] = waited
        batch = StepBatch.from_groups(groups, scale_by_std=self.cfg.algorithm.scale_advantage_by_std)
        failures = self.engine.client.failures
        metrics.setdefault("rollout", {}).update(
            server_failures=failures - self._failures_logged, server_restarts=self._restarts
        )
        self._failures_logged, self._restarts = failures, 0
        return batch, metrics

    def pause(self) -> None:
        """Before a weight update, overlapped: interrupt generation (or let the next batch finish first, when
        deterministic, so that no interruption depends on timing)."""
        if self._ahead is None:
            return
        if self.cfg.train.deterministic:
            self._ahead[1].result()
        else:
            self.engine.run(self.collector.pause())

    def resume(self, version: int) -> None:
        """After a weight update: the engine holds `version`, and generation goes on with it."""
        self.engine.run(self.collector.resume(version))

    def release_memory(self) -> None:
        """Colocated servers hand their GPU memory to training."""
        self.engine.run(self.engine.client.release_memory())

    def resume_memory(self, tags: list[str]) -> None:
        self.engine.run(self.engine.client.resume_memory(tags))

    def evaluate(self) -> Metrics:
        """The evaluation set through the engine (the paper: avg@32, T 1.0, top-p 0.7); {} without one."""
        if not self.eval_prompts:
            return {}
        started = time.perf_counter()
        result = self.engine.run(
            evaluate(
                self.engine.client,
                self.eval_prompts,
                samples_per_problem=self.cfg.eval.samples_per_problem,
                params=eval_params(self.cfg, self.stop_token_ids),
                tokenizer=self.tokenizer,
                boxed_fallback=self.cfg.algorithm.boxed_fallback,
                progress_desc=None,
            )
        )
        return {"eval": result.metrics(), "timing": {"eval_s": time.perf_counter() - started}}

    def state_dict(self) -> dict[str, Any]:
        """The prompt stream's position, the groups carried into the next step, the flights to continue,
        and the next step's batch when it is already collected; taken on the engine's loop, between two of
        the collector's moves."""
        return self.engine.run(self._state_dict())

    async def _state_dict(self) -> dict[str, Any]:
        state = {
            "loader": self.loader.state_dict(),
            "sampler": self.sampler.state_dict(),
            "collector": self.collector.state_dict(),
        }
        if self._ahead is not None and self._ahead[1].done() and self._ahead[1].exception() is None:
            groups, metrics = self._ahead[1].result()
            state["ahead"] = {"step": self._ahead[0], "groups": groups, "metrics": metrics}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.sampler.load_state_dict(state["sampler"])
        self._restored = state

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
        self._closing.close()


# ---- sampling, from the config in one place --------------------------------------------------------------


def rollout_settings(cfg: DapoConfig, stop_token_ids: tuple[int, ...]) -> RolloutSettings:
    """How training rollouts sample and are rewarded."""
    r, a = cfg.rollout, cfg.algorithm
    return RolloutSettings(
        samples_per_prompt=a.samples_per_prompt,
        params=SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=r.max_response_tokens,
            stop_token_ids=stop_token_ids,
        ),
        max_inflight_prompts=r.max_inflight_prompts or 2 * cfg.train.prompts_per_step,
        seed=cfg.train.seed,
        deterministic=cfg.train.deterministic,
        partial=r.partial,
        max_staleness=r.max_staleness,
        regenerate_stale=r.stale_groups == "regenerate",
        reward=RewardSettings(
            max_response_tokens=r.max_response_tokens,
            overlong_buffer_tokens=a.overlong_buffer_tokens if a.overlong_penalty else None,
            boxed_fallback=a.boxed_fallback,
        ),
    )


def eval_params(cfg: DapoConfig, stop_token_ids: tuple[int, ...]) -> SamplingParams:
    """How evaluation samples: the same seeds every time, so that differences come from the policy."""
    e = cfg.eval
    return SamplingParams(
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_response_tokens or cfg.rollout.max_response_tokens,
        stop_token_ids=stop_token_ids,
        seed=cfg.train.seed,
    )


def _done(*result: Any) -> Future:
    """A finished future holding `result`: the next step's batch, collected before a checkpoint."""
    future: Future = Future()
    future.set_result(result)
    return future
