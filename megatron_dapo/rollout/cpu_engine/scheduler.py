"""Continuous batching for the CPU engine: sequences join the running batch at every step and leave when done.

One step (on the model thread): feed the running rows the tokens they sampled last step (one batched forward),
prefill the sequences admitted since, sample one token for every row, and retire the rows that finished. The
forward passes come before any sequence finishes, so a failing step loses no finished sequence. The asyncio
side only queues sequences, flags aborts and resolves futures, so HTTP stays responsive while the model runs.
Operations that change the model (weights, memory) run exclusively, like SGLang's model-update writer lock:
new requests wait, and the operation starts once every queued and running sequence has ended.

Failures stay with their request: input is validated before it is queued (sglang_protocol, and the context
check here), and a prompt whose prefill fails fails its own request only. A failing batched decode fails every
running sequence: nothing tells which row broke it.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar

import torch

from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.requests import EngineSampling, GenerateItem
from megatron_dapo.rollout.cpu_engine.sampling import sample_tokens
from megatron_dapo.rollout.sglang_protocol import ProtocolError, finish_abort, finish_length, finish_stop

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class Sequence:
    """One sample being generated, and what it produced."""

    item: GenerateItem
    max_new_tokens: int  # the request's limit, capped by the context length
    generator: torch.Generator
    done: asyncio.Future
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens served from the prompt cache
    finish_reason: dict | None = None
    abort_requested: bool = False
    error: Exception | None = None  # its own prefill failed: it alone fails, the batch goes on


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def finish_reason_after(
    token: int,
    generated_tokens: int,
    max_new_tokens: int,
    sampling: EngineSampling,
    eos_token_ids: frozenset[int],
) -> dict | None:
    """SGLang's Req.check_finished for a freshly appended token: the length limit first, then stop tokens."""
    if generated_tokens >= max_new_tokens:
        return finish_length(max_new_tokens)
    if not sampling.ignore_eos and (token in sampling.stop_token_ids or token in eos_token_ids):
        return finish_stop(token)
    return None


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        eos_token_ids: frozenset[int],
        max_running_requests: int,
        seed: int,
        allow_auto_truncate: bool = False,
    ):
        self.runner = runner
        self.allow_auto_truncate = allow_auto_truncate
        self.eos_token_ids = eos_token_ids
        self.max_running_requests = max_running_requests
        self._seed = seed
        self._sequences_seen = 0
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._pending_logits: torch.Tensor | None = None  # [running rows, vocab]
        # One model thread: steps and exclusive operations never overlap.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine-model")
        self._work = asyncio.Event()  # set while sequences wait or run
        self._idle = asyncio.Event()  # set when none does
        self._idle.set()
        self._admission_open = asyncio.Event()  # cleared while an exclusive operation waits or runs
        self._admission_open.set()
        self._exclusive_lock = asyncio.Lock()

    @property
    def active(self) -> int:
        return len(self._waiting) + len(self._running)

    def _new_sequence(self, item: GenerateItem) -> Sequence:
        item, max_new_tokens = self._fit_context(item)
        seed = item.sampling.sampling_seed
        if seed is None:  # reproducible from --random-seed and the order of arrival
            seed = self._seed + self._sequences_seen
        self._sequences_seen += 1
        return Sequence(
            item=item,
            max_new_tokens=max_new_tokens,
            generator=torch.Generator().manual_seed(seed % 2**63),
            done=asyncio.get_running_loop().create_future(),
        )

    def _fit_context(self, item: GenerateItem) -> tuple[GenerateItem, int]:
        """The item and its token budget, as SGLang's tokenizer manager checks them: prompt + max_new_tokens
        must stay below the context length; with allow_auto_truncate the prompt is cut to the context and
        max_new_tokens to what is left, else the request is refused. No max_new_tokens: up to the context."""
        context, prompt_length = self.runner.context_length, len(item.input_ids)
        if prompt_length >= context:
            if not self.allow_auto_truncate:
                raise ProtocolError(
                    "input_ids", f"{prompt_length} prompt tokens do not fit the context length of {context}"
                )
            item, prompt_length = replace(item, input_ids=item.input_ids[:context]), context
        room = context - prompt_length
        limit = item.sampling.max_new_tokens
        if limit is None:
            return item, room
        if limit + prompt_length >= context and not self.allow_auto_truncate:
            raise ProtocolError(
                "sampling_params.max_new_tokens",
                f"{prompt_length} prompt tokens + {limit} new tokens reach the context length of {context}: "
                "ask for fewer (SGLang refuses this too unless started with --allow-auto-truncate)",
            )
        return item, min(limit, room)

    async def generate(self, items: list[GenerateItem]) -> list[Sequence]:
        """Queue the sequences and wait for all of them; cancelling the wait aborts them."""
        await self._admission_open.wait()
        sequences = [self._new_sequence(item) for item in items]
        self._waiting += sequences
        self._idle.clear()
        self._work.set()
        try:
            await asyncio.gather(*(sequence.done for sequence in sequences))
        except BaseException:  # the client went away, or a sequence failed: free the rows of the others
            for sequence in sequences:
                sequence.abort_requested = True
                sequence.done.add_done_callback(_consume)  # the first failure is reported; drop the rest
            raise
        return sequences

    def abort(self, rid: str | None) -> None:
        """Flag the sequences to end at the next step: all of them for None, else as SGLang does it, every rid
        that starts with `rid` provided one equals it (its tokenizer manager drops unknown rids, then its
        scheduler matches by prefix)."""
        sequences = self._waiting + self._running
        if rid is not None and all(sequence.item.rid != rid for sequence in sequences):
            return
        for sequence in sequences:
            if rid is None or sequence.item.rid.startswith(rid):
                sequence.abort_requested = True

    async def exclusive(self, operation: Callable[[], T]) -> T:
        """Run `operation` on the model thread once no sequence is queued or running."""
        async with self._exclusive_lock:
            self._admission_open.clear()
            try:
                await self._idle.wait()
                return await asyncio.get_running_loop().run_in_executor(self._executor, operation)
            finally:
                self._admission_open.set()

    async def run(self) -> None:
        """The batching loop; runs for the life of the server."""
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            self._retire_aborted_waiting()
            admitted = self._waiting[: max(0, self.max_running_requests - len(self._running))]
            self._waiting = self._waiting[len(admitted) :]
            try:
                finished = await loop.run_in_executor(self._executor, self._step, admitted)
            except Exception as error:  # a broken forward fails its requests, not the server
                logger.exception("model step failed")
                finished = self._fail_running(admitted, error)
            for sequence in finished:
                if sequence.done.done():
                    continue
                if sequence.error is None:
                    sequence.done.set_result(None)
                else:
                    sequence.done.set_exception(RuntimeError(f"the prefill failed: {sequence.error}"))
            if not self._waiting and not self._running:
                self._work.clear()
                self._idle.set()

    def _retire_aborted_waiting(self) -> None:
        for sequence in [s for s in self._waiting if s.abort_requested]:
            sequence.finish_reason = finish_abort("Abort in waiting queue")
            if not sequence.done.done():  # its waiter may be gone (a cancelled handler)
                sequence.done.set_result(None)
            self._waiting.remove(sequence)

    def _fail_running(self, admitted: list[Sequence], error: Exception) -> list[Sequence]:
        failed = self._running + admitted
        self._running, self._pending_logits = [], None
        self.runner.reset_batch()
        for sequence in failed:
            if not sequence.done.done():
                sequence.done.set_exception(RuntimeError(f"the model step failed: {error}"))
        return []

    def _step(self, admitted: list[Sequence]) -> list[Sequence]:
        """Decode, admit, sample a token per row, retire the finished rows (on the model thread)."""
        if self._running:
            self._pending_logits = self.runner.decode([sequence.output_ids[-1] for sequence in self._running])
        finished = self._admit(admitted)
        if not self._running:
            return finished
        rows = self._running
        samplings = [sequence.item.sampling for sequence in rows]
        uniforms = torch.stack([torch.rand((), generator=sequence.generator) for sequence in rows])
        tokens, logprobs = sample_tokens(
            self._pending_logits,
            temperatures=torch.tensor([sampling.temperature for sampling in samplings]),
            top_ps=torch.tensor([sampling.top_p for sampling in samplings]),
            top_ks=torch.tensor([sampling.top_k or self.runner.vocab_size for sampling in samplings]),
            uniforms=uniforms,
        )
        keep = []
        for row, (sequence, token, logprob) in enumerate(
            zip(rows, tokens.tolist(), logprobs.tolist(), strict=True)
        ):
            if sequence.abort_requested:
                sequence.finish_reason = finish_abort("Aborted by AbortReq.")
            else:
                sequence.output_ids.append(token)
                sequence.logprobs.append(logprob)
                sequence.finish_reason = finish_reason_after(
                    token,
                    len(sequence.output_ids),
                    sequence.max_new_tokens,
                    sequence.item.sampling,
                    self.eos_token_ids,
                )
            if sequence.finish_reason is None:
                keep.append(row)
            else:
                finished.append(sequence)
        self._running = [rows[row] for row in keep]
        self.runner.keep_rows(keep)
        self._pending_logits = self._pending_logits[torch.tensor(keep, dtype=torch.long)] if keep else None
        return finished

    def _admit(self, admitted: list[Sequence]) -> list[Sequence]:
        """Prefill the admitted sequences into the batch; those with nothing to generate finish at once, and
        those whose prefill fails leave with their error (the batch's cache is untouched until add_rows)."""
        finished, joining, prefills = [], [], []
        for sequence in admitted:
            if sequence.max_new_tokens == 0:
                sequence.finish_reason = finish_length(0)
                finished.append(sequence)
                continue
            try:
                prefill, cached = self.runner.prefill(sequence.item.input_ids)
            except Exception as error:  # nothing of this prompt entered the batch: fail it alone
                logger.exception("prefill of %s failed", sequence.item.rid)
                sequence.error = error
                finished.append(sequence)
                continue
            sequence.cached_tokens = len(sequence.item.input_ids) if cached else 0
            joining.append(sequence)
            prefills.append(prefill)
        if joining:
            self.runner.add_rows(prefills)
            new_logits = torch.stack([prefill.logits for prefill in prefills])
            self._pending_logits = (
                new_logits if self._pending_logits is None else torch.cat([self._pending_logits, new_logits])
            )
            self._running += joining
        return finished

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
