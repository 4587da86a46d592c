"""The rollout role: on global rank 0, the prompt stream, the rollout engine, streaming dynamic sampling,
scoring and evaluation. It produces each step's batch and hands it over as a StepBatch; it knows nothing of
Megatron. Data loads first, so that a bad row is reported before a model is built or a server started."""

import contextlib
import logging
import time
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

    def generate(self, step: int) -> tuple[StepBatch, Metrics]:
        """The step's groups (G samples per prompt, rewarded, 0 < #correct < G under dynamic sampling) as
        samples with group-normalised advantages, and the rollout metrics."""
        groups, metrics = self.engine.run(self.collector.collect(step))
        batch = StepBatch.from_groups(groups, scale_by_std=self.cfg.algorithm.scale_advantage_by_std)
        failures = self.engine.client.failures
        metrics.setdefault("rollout", {}).update(
            server_failures=failures - self._failures_logged, server_restarts=self._restarts
        )
        self._failures_logged, self._restarts = failures, 0
        return batch, metrics

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
        """The prompt stream's position and the groups carried into the next step."""
        return {"loader": self.loader.state_dict(), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
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
