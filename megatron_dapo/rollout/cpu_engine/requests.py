"""The CPU engine's side of SGLang's protocol: every request body it serves, parsed and checked, each bad
field refused with a ProtocolError that names it (rollout/sglang_protocol.py holds the schema both sides
share, and the client's side)."""

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from megatron_dapo.rollout.sglang_protocol import (
    ABORT_REQ_FIELDS,
    CONTINUE_GENERATION_FIELDS,
    DEFAULT_GROUP_NAME,
    DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS,
    GENERATE_REQ_FIELDS,
    GREEDY_TEMPERATURE_EPS,
    INIT_WEIGHTS_UPDATE_GROUP_FIELDS,
    MEMORY_OCCUPATION_FIELDS,
    MEMORY_TAGS,
    PAUSE_GENERATION_FIELDS,
    PAUSE_MODES,
    SAMPLING_PARAMS_FIELDS,
    TOP_K_ALL,
    UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS,
    UPDATE_WEIGHTS_FROM_TENSOR_FIELDS,
    ProtocolError,
)

# /generate fields that change nothing about the generated tokens: accepted and ignored.
_GENERATE_METADATA_FIELDS = frozenset(
    {"log_metrics", "no_logs", "custom_labels", "priority", "routing_key", "conversation_id", "received_time",
     "external_trace_header", "http_worker_ipc", "extra_key", "cache_salt", "routed_dp_rank",
     "data_parallel_rank"}
)  # fmt: skip
_GENERATE_HONOURED_FIELDS = frozenset(
    {"rid", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
     "return_text_in_logprobs", "stream"}
)  # fmt: skip
_SAMPLING_HONOURED_FIELDS = frozenset(
    {"max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "n", "ignore_eos", "sampling_seed",
     "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
)  # fmt: skip
# Sampling fields the CPU engine rejects unless they hold SGLang's default.
_SAMPLING_DEFAULTS = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0,
}  # fmt: skip


@dataclass(frozen=True)
class EngineSampling:
    """Sampling settings after SGLang's normalisation (SamplingParams.__post_init__ and verify)."""

    temperature: float  # > 0; greedy requests carry 1.0 with top_k = 1, as in SGLang
    top_p: float  # in (0, 1]
    top_k: int | None  # None: the whole vocabulary
    max_new_tokens: int | None  # tokens; None: up to the context length
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    sampling_seed: int | None
    skip_special_tokens: bool  # these two shape only the returned text
    no_stop_trim: bool


@dataclass(frozen=True)
class GenerateItem:
    """One sequence to generate: SGLang expands a batch of prompts times n into these."""

    rid: str
    input_ids: tuple[int, ...]
    sampling: EngineSampling
    return_logprob: bool
    return_text_in_logprobs: bool


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (int, float, str, list, dict)) and not value)


def _reject_unknown(body: Mapping[str, Any], schema: frozenset[str], where: str) -> None:
    if not isinstance(body, Mapping):
        raise ProtocolError(where, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - schema)
    if unknown:
        raise ProtocolError(f"{where}.{unknown[0]}", f"not a field of SGLang's schema (unknown: {unknown})")


def parse_engine_sampling(body: Mapping[str, Any] | None) -> tuple[EngineSampling, int]:
    """SGLang's sampling params as the CPU engine runs them, and n (samples per prompt)."""
    body = body or {}
    _reject_unknown(body, SAMPLING_PARAMS_FIELDS, "sampling_params")
    for name, value in body.items():
        if name in _SAMPLING_HONOURED_FIELDS:
            continue
        if name in _SAMPLING_DEFAULTS and (value is None or value == _SAMPLING_DEFAULTS[name]):
            continue
        if name not in _SAMPLING_DEFAULTS and _is_unset(value):
            continue
        raise ProtocolError(f"sampling_params.{name}", f"{value!r} is not supported by the CPU engine")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _integer(body.get("top_k"), "sampling_params.top_k", default=-1)
    if not temperature >= 0.0 or temperature == float("inf"):
        raise ProtocolError(
            "sampling_params.temperature", f"must be a non-negative finite number, got {temperature}"
        )
    if 0.0 <= temperature < GREEDY_TEMPERATURE_EPS:
        temperature, top_k = 1.0, 1
    if not 0.0 < top_p <= 1.0:
        raise ProtocolError("sampling_params.top_p", f"must be in (0, 1], got {top_p}")
    if top_k < 1 and top_k != -1:
        raise ProtocolError("sampling_params.top_k", f"must be -1 (disabled) or at least 1, got {top_k}")
    max_new_tokens = body.get("max_new_tokens", 128)
    if max_new_tokens is not None:
        max_new_tokens = _integer(max_new_tokens, "sampling_params.max_new_tokens", minimum=0)
    n = _integer(body.get("n"), "sampling_params.n", default=1, minimum=1)
    seed = body.get("sampling_seed")
    if seed is not None:
        seed = _integer(seed, "sampling_params.sampling_seed")
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list):
        raise ProtocolError(
            "sampling_params.stop_token_ids", f"must be a list of token ids, got {stop_token_ids!r}"
        )
    sampling = EngineSampling(
        temperature=temperature,
        top_p=top_p,
        top_k=None if top_k == -1 or top_k >= TOP_K_ALL else top_k,
        max_new_tokens=max_new_tokens,
        stop_token_ids=frozenset(
            _integer(token, f"sampling_params.stop_token_ids[{index}]")
            for index, token in enumerate(stop_token_ids)
        ),
        ignore_eos=bool(body.get("ignore_eos", False)),
        sampling_seed=seed,
        skip_special_tokens=body.get("skip_special_tokens", True) is not False,
        no_stop_trim=bool(body.get("no_stop_trim", False)),
    )
    return sampling, n


def _integer(value: Any, field: str, *, default: int | None = None, minimum: int | None = None) -> int:
    """A JSON integer (an integral float too; never a boolean, which Python counts as an int)."""
    if value is None and default is not None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(field, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ProtocolError(field, f"must be an integer >= {minimum}, got {value}")
    return value


def _string(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(field, f"must be a string, got {value!r}")
    return value


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:  # SGLang treats null as "use the default"
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"sampling_params.{name}", f"must be a number, got {value!r}")
    return float(value)


def _input_batch(body: Mapping[str, Any], vocab_size: int) -> tuple[list[tuple[int, ...]], bool]:
    """The prompts of a /generate body and whether it was a single prompt."""
    if body.get("text") is not None or body.get("input_embeds") is not None:
        raise ProtocolError(
            "text", "the CPU engine takes token ids: send input_ids instead of text/input_embeds"
        )
    input_ids = body.get("input_ids")
    if not isinstance(input_ids, list) or not input_ids:
        raise ProtocolError("input_ids", "must be a non-empty list of token ids (or a list of such lists)")
    is_single = not isinstance(input_ids[0], list)
    prompts = [input_ids] if is_single else input_ids
    checked = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt:
            raise ProtocolError(f"input_ids[{index}]", "must be a non-empty list of token ids")
        # type() and not isinstance(): JSON true is a Python bool, which is an int.
        if not all(type(token) is int and 0 <= token < vocab_size for token in prompt):
            raise ProtocolError(
                f"input_ids[{index}]", f"token ids must be integers (not booleans) in [0, {vocab_size})"
            )
        checked.append(tuple(prompt))
    return checked, is_single


def _expanded_rids(rid: Any, batch_size: int, n: int, is_single: bool) -> list[str]:
    """Request ids as GenerateReqInput.normalize_batch_and_arguments expands them."""
    total = batch_size * n
    if is_single and n == 1:
        if rid is not None and not isinstance(rid, str):
            raise ProtocolError("rid", "must be a string for a single request")
        return [rid or uuid.uuid4().hex]
    if rid is None:
        return [uuid.uuid4().hex for _ in range(total)]
    if isinstance(rid, str):
        return [f"{rid}_{index}" for index in range(total)]
    if isinstance(rid, list) and len(rid) == batch_size and all(isinstance(r, str) for r in rid):
        return [
            f"{rid[index % batch_size]}_{index // batch_size}" if n > 1 else rid[index]
            for index in range(total)
        ]
    raise ProtocolError("rid", f"must be a string or a list of {batch_size} strings")


def parse_generate_request(
    body: Mapping[str, Any], vocab_size: int, max_sequences: int = 1024
) -> tuple[list[GenerateItem], bool]:
    """The sequences a /generate body asks for, in SGLang's output order, and whether to answer with one dict.

    With n samples of a batch of prompts SGLang repeats the whole batch n times: output k is prompt k % batch.
    More than `max_sequences` (prompts x n) are refused before any is made.
    """
    _reject_unknown(body, GENERATE_REQ_FIELDS, "generate")
    for name, value in body.items():
        if (
            name not in _GENERATE_HONOURED_FIELDS
            and name not in _GENERATE_METADATA_FIELDS
            and not _is_unset(value)
        ):
            raise ProtocolError(name, f"{value!r} is not supported by the CPU engine")
    if body.get("stream"):
        raise ProtocolError("stream", "streaming is not supported by the CPU engine; send stream=false")
    if body.get("top_logprobs_num"):
        raise ProtocolError("top_logprobs_num", "top log-probs are not supported by the CPU engine")
    if body.get("logprob_start_len") not in (None, -1):
        raise ProtocolError(
            "logprob_start_len", "the CPU engine returns output-token log-probs only: send -1"
        )
    sampling_body = body.get("sampling_params")
    if isinstance(sampling_body, list):
        raise ProtocolError("sampling_params", "send one sampling_params dict for the whole batch")
    sampling, n = parse_engine_sampling(sampling_body)
    if n > max_sequences:
        raise ProtocolError("sampling_params.n", f"{n} samples: this server takes at most {max_sequences}")
    prompts, is_single = _input_batch(body, vocab_size)
    if len(prompts) * n > max_sequences:
        raise ProtocolError(
            "input_ids",
            f"{len(prompts)} prompts x n={n}: this server takes at most {max_sequences} sequences",
        )
    rids = _expanded_rids(body.get("rid"), len(prompts), n, is_single)
    items = [
        GenerateItem(
            rid=rids[index],
            input_ids=prompts[index % len(prompts)],
            sampling=sampling,
            return_logprob=bool(body.get("return_logprob")),
            return_text_in_logprobs=bool(body.get("return_text_in_logprobs")),
        )
        for index in range(len(prompts) * n)
    ]
    return items, is_single and n == 1


@dataclass(frozen=True)
class AbortRequest:
    rid: str
    abort_all: bool


def parse_abort_request(body: Mapping[str, Any]) -> AbortRequest:
    _reject_unknown(body, ABORT_REQ_FIELDS, "abort_request")
    rid, abort_all = _string(body.get("rid") or "", "rid"), bool(body.get("abort_all", False))
    if not abort_all and not rid:
        raise ProtocolError("rid", "give the rid to abort, or abort_all=true")
    return AbortRequest(rid=rid, abort_all=abort_all)


def parse_pause_generation(body: Mapping[str, Any] | None) -> str:
    """The pause mode; SGLang's default ("abort") for an empty body."""
    body = body or {}
    _reject_unknown(body, PAUSE_GENERATION_FIELDS, "pause_generation")
    mode = body.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise ProtocolError("mode", f"{mode!r} is not a pause mode; use one of {PAUSE_MODES}")
    return mode


def parse_continue_generation(body: Mapping[str, Any] | None) -> None:
    """Checks the fields only: torch_empty_cache frees GPU memory, which the CPU engine has none of."""
    _reject_unknown(body or {}, CONTINUE_GENERATION_FIELDS, "continue_generation")


@dataclass(frozen=True)
class UpdateWeightsFromTensor:
    serialized_named_tensors: list[str]  # one base64 payload per TP rank
    load_format: str | None
    abort_all_requests: bool
    weight_version: str | None  # flush_cache is accepted and not needed: the CPU engine always flushes


def parse_update_weights_from_tensor(body: Mapping[str, Any]) -> UpdateWeightsFromTensor:
    _reject_unknown(body, UPDATE_WEIGHTS_FROM_TENSOR_FIELDS, "update_weights_from_tensor")
    payloads = body.get("serialized_named_tensors")
    if not isinstance(payloads, list) or not payloads or not all(isinstance(p, str) for p in payloads):
        raise ProtocolError(
            "serialized_named_tensors", "must be a non-empty list of base64 strings, one per TP rank"
        )
    return UpdateWeightsFromTensor(
        serialized_named_tensors=payloads,
        load_format=body.get("load_format"),
        abort_all_requests=bool(body.get("abort_all_requests", False)),
        weight_version=_optional_str(body, "weight_version"),
    )


@dataclass(frozen=True)
class InitWeightsUpdateGroup:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str


def parse_init_weights_update_group(body: Mapping[str, Any]) -> InitWeightsUpdateGroup:
    _reject_unknown(body, INIT_WEIGHTS_UPDATE_GROUP_FIELDS, "init_weights_update_group")
    missing = [
        name for name in ("master_address", "master_port", "rank_offset", "world_size") if name not in body
    ]
    if missing:
        raise ProtocolError(missing[0], "required field missing")
    master_port = _integer(body["master_port"], "master_port", minimum=1)
    if master_port > 65535:
        raise ProtocolError("master_port", f"{master_port} is not a TCP port")
    return InitWeightsUpdateGroup(
        master_address=_string(body["master_address"], "master_address"),
        master_port=master_port,
        rank_offset=_integer(body["rank_offset"], "rank_offset", minimum=0),
        world_size=_integer(body["world_size"], "world_size", minimum=1),
        group_name=_string(body.get("group_name") or DEFAULT_GROUP_NAME, "group_name"),
        backend=_string(body.get("backend") or "nccl", "backend"),
    )


def parse_destroy_weights_update_group(body: Mapping[str, Any]) -> str:
    _reject_unknown(body, DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS, "destroy_weights_update_group")
    return _string(body.get("group_name") or DEFAULT_GROUP_NAME, "group_name")


@dataclass(frozen=True)
class UpdateWeightsFromDistributed:
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str
    load_format: str | None
    abort_all_requests: bool
    weight_version: str | None


def parse_update_weights_from_distributed(body: Mapping[str, Any]) -> UpdateWeightsFromDistributed:
    _reject_unknown(body, UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS, "update_weights_from_distributed")
    names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
    if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
        raise ProtocolError("names", "names, dtypes and shapes must be lists")
    if not len(names) == len(dtypes) == len(shapes):
        raise ProtocolError("names", f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
    if not all(isinstance(shape, list) for shape in shapes):
        raise ProtocolError("shapes", "each shape must be a list of sizes")
    return UpdateWeightsFromDistributed(
        names=[_string(name, f"names[{index}]") for index, name in enumerate(names)],
        dtypes=[_string(dtype, f"dtypes[{index}]") for index, dtype in enumerate(dtypes)],
        shapes=[
            [_integer(size, f"shapes[{index}]", minimum=0) for size in shape]
            for index, shape in enumerate(shapes)
        ],
        group_name=_string(body.get("group_name") or DEFAULT_GROUP_NAME, "group_name"),
        load_format=body.get("load_format"),
        abort_all_requests=bool(body.get("abort_all_requests", False)),
        weight_version=_optional_str(body, "weight_version"),
    )


def parse_memory_tags(body: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The tags of a release/resume body; no tags means every tag, as in SGLang."""
    body = body or {}
    _reject_unknown(body, MEMORY_OCCUPATION_FIELDS, "memory_occupation")
    tags = body.get("tags")
    if tags is None:
        return MEMORY_TAGS
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise ProtocolError("tags", f"must be a list of memory tags {MEMORY_TAGS} or null, got {tags!r}")
    unknown = set(tags) - set(MEMORY_TAGS)
    if unknown:
        raise ProtocolError("tags", f"unknown memory tags {sorted(unknown)}; SGLang knows {MEMORY_TAGS}")
    return tuple(tags)


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    return None if value is None else str(value)


# ---------------------------------------------------------------- server side (CPU engine): responses


def generate_output(
    *,
    rid: str,
    output_ids: Sequence[int],
    logprobs: Sequence[float] | None,
    token_texts: Sequence[str | None] | None,
    text: str | None,
    finish_reason: dict,
    prompt_tokens: int,
    cached_tokens: int,
    weight_version: str,
    e2e_latency: float,
    weight_versions: list[dict] | None = None,
    retractions: int = 0,
) -> dict:
    """One /generate output as SGLang's tokenizer manager builds it (no "text" when there is no tokenizer;
    weight_versions, the spans of output tokens per version, as newer SGLang reports them)."""
    meta_info = {
        "id": rid,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "weight_version": weight_version,
        "total_retractions": retractions,
        "completion_tokens": len(output_ids),
        "cached_tokens": cached_tokens,
        "e2e_latency": e2e_latency,
    }
    if weight_versions is not None:
        meta_info["weight_versions"] = weight_versions
    if logprobs is not None:
        texts = token_texts if token_texts is not None else [None] * len(output_ids)
        meta_info["input_token_logprobs"] = []
        meta_info["output_token_logprobs"] = [
            [logprob, token, token_text]
            for logprob, token, token_text in zip(logprobs, output_ids, texts, strict=True)
        ]
    output = {"output_ids": list(output_ids), "meta_info": meta_info}
    if text is not None:
        output = {"text": text, **output}
    return output


def success_body(success: bool, message: str) -> dict:
    return {"success": success, "message": message}


def model_info_body(model_path: str, tokenizer_path: str | None, weight_version: str) -> dict:
    return {
        "model_path": model_path,
        "tokenizer_path": tokenizer_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": weight_version,
    }
