"""Continuous batching for the CPU engine: sequences join the running batch at every step and leave when done.

One step (on the model thread): feed the running rows the tokens they sampled last step (one batched forward),
prefill the sequences admitted since, sample one token for every row, and retire the rows that finished. The
forward passes come before any sequence finishes, so a failing step loses no finished sequence. The asyncio
side only queues sequences, flags aborts and resolves futures, so HTTP stays responsive while the model runs.
Operations that change the model (weights, memory) run exclusively, like SGLang's model-update writer lock:
new requests wait, and the operation starts once every queued and running sequence has ended, or at once
while generation is paused (SGLang skips the lock then too).

Pausing (SGLang's /pause_generation) stops the loop between two steps; new requests wait until it continues.
"abort" ends every sequence with what it generated so far; "retract" puts the running ones back in the queue,
and they are prefilled again (prompt + tokens so far, under the weights of that moment) when admitted after
continue; "in_place" keeps them in the batch with their KV cache, computed under the old weights.

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
ABORTED = "Aborted by AbortReq."  # SGLang's finish message for a running request it aborts


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
    # (weight version, index of the first output token it generated), in token order
    version_starts: list[tuple[str, int]] = field(default_factory=list)
    retractions: int = 0  # times it was put back in the queue by a pause in "retract" mode
    finish_reason: dict | None = None
    abort_requested: bool = False
    error: Exception | None = None  # its own prefill failed: it alone fails, the batch goes on

    def append(self, token: int, logprob: float, weight_version: str) -> None:
        if not self.version_starts or self.version_starts[-1][0] != weight_version:
            self.version_starts.append((weight_version, len(self.output_ids)))
        self.output_ids.append(token)
        self.logprobs.append(logprob)

    def weight_version_spans(self, current_version: str) -> list[dict]:
        """SGLang's meta_info.weight_versions: the output tokens each version generated, `end` exclusive
        (no token: one empty span of the current version, as SGLang reports it)."""
        starts = self.version_starts or [(current_version, 0)]
        ends = [start for _, start in starts[1:]] + [len(self.output_ids)]
        return [
            {"version": version, "start": start, "end": end}
            for (version, start), end in zip(starts, ends, strict=True)
        ]


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
        self.weight_version = "default"  # set between steps (on the model thread): tokens record it
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
        self._unpaused = asyncio.Event()  # cleared from a pause until continue
        self._unpaused.set()
        self._paused = asyncio.Event()  # set once a pause took effect: no step runs until continue
        self._step_lock = asyncio.Lock()  # held by the loop across a step, and by a pause taking effect

    @property
    def active(self) -> int:
        return len(self._waiting) + len(self._running)

    @property
    def can_flush(self) -> bool:
        """Whether no sequence needs the cached prompts: none runs, and none waits unless paused."""
        return not self._running and (not self._waiting or self._paused.is_set())

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
        while not (self._admission_open.is_set() and self._unpaused.is_set()):
            await self._admission_open.wait()
            await self._unpaused.wait()
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
            self._retire_aborted_waiting_while_paused()
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
        self._retire_aborted_waiting_while_paused()

    def _retire_aborted_waiting_while_paused(self) -> None:
        """A paused engine ends aborted queued sequences at once (running ones end at the next step)."""
        if self._paused.is_set():
            self._retire_aborted_waiting()
            self._update_idle()

    async def exclusive(self, operation: Callable[[], T]) -> T:
        """Run `operation` on the model thread once no sequence is queued or running, or generation is
        paused (no step runs then; one queued by a continue meanwhile runs after the operation)."""
        async with self._exclusive_lock:
            self._admission_open.clear()
            try:
                await _first_set(self._idle, self._paused)
                return await asyncio.get_running_loop().run_in_executor(self._executor, operation)
            finally:
                self._admission_open.set()

    async def pause(self, mode: str) -> None:
        """Stop generating after the current step (SGLang's pause_generation); returns once in effect."""
        self._unpaused.clear()
        async with self._step_lock:
            if self._unpaused.is_set():  # continued before the pause took effect
                return
            if mode == "abort":
                self._abort_everything()
            elif mode == "retract":
                for sequence in self._running:
                    sequence.retractions += 1
                self._waiting = self._running + self._waiting  # first admitted again, in their order
                self._running, self._pending_logits = [], None
            if not self._running:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.reset_batch)
            self._paused.set()
            self._retire_aborted_waiting_while_paused()  # those flagged while the last step ran

    def resume(self) -> None:
        """Generate again (SGLang's continue_generation); a no-op when not paused."""
        self._paused.clear()
        self._unpaused.set()

    def _abort_everything(self) -> None:
        """End every sequence now with its tokens so far, as SGLang's abort of all requests does."""
        for sequences, message in ((self._waiting, "Abort in waiting queue"), (self._running, ABORTED)):
            for sequence in sequences:
                sequence.finish_reason = finish_abort(message)
                if not sequence.done.done():
                    sequence.done.set_result(None)
        self._waiting, self._running, self._pending_logits = [], [], None

    async def run(self) -> None:
        """The batching loop; runs for the life of the server."""
        while True:
            await self._work.wait()
            await self._unpaused.wait()
            async with self._step_lock:
                if self._unpaused.is_set():  # a pause may have taken effect while this waited
                    await self._run_step()

    async def _run_step(self) -> None:
        self._retire_aborted_waiting()
        admitted = self._waiting[: max(0, self.max_running_requests - len(self._running))]
        self._waiting = self._waiting[len(admitted) :]
        try:
            finished = await asyncio.get_running_loop().run_in_executor(self._executor, self._step, admitted)
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
        self._update_idle()

    def _update_idle(self) -> None:
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
                sequence.finish_reason = finish_abort(ABORTED)
            else:
                sequence.append(token, logprob, self.weight_version)
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
        those whose prefill fails leave with their error (the batch's cache is untouched until add_rows).
        A retracted sequence is prefilled with its tokens so far, outside the prompt cache."""
        finished, joining, prefills = [], [], []
        for sequence in admitted:
            if sequence.max_new_tokens == 0:
                sequence.finish_reason = finish_length(0)
                finished.append(sequence)
                continue
            resumed = bool(sequence.output_ids)
            try:
                prefill, cached = self.runner.prefill(
                    sequence.item.input_ids + tuple(sequence.output_ids), remember=not resumed
                )
            except Exception as error:  # nothing of this prompt entered the batch: fail it alone
                logger.exception("prefill of %s failed", sequence.item.rid)
                sequence.error = error
                finished.append(sequence)
                continue
            if not resumed:
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


async def _first_set(*events: asyncio.Event) -> None:
    """Return once any of `events` is set."""
    if any(event.is_set() for event in events):
        return
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
