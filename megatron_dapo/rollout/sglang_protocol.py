"""SGLang's HTTP protocol: the routes and field names both sides share, and the client's side (request
bodies built, responses parsed); the CPU engine parses and answers requests in rollout/cpu_engine/requests.py.

Field names, defaults and semantics follow SGLang's own definitions: `GenerateReqInput` and the weight-update,
memory and abort structs of `srt/managers/io_struct.py`, `srt/sampling/sampling_params.py`, the routes of
`srt/entrypoints/http_server.py`, and the finish reasons of `srt/managers/schedule_batch.py`. The commits read
are pinned in tests/unit/test_rollout_protocol.py, which also pins every field name, so the client and the
CPU engine cannot drift from SGLang or from each other. Nothing here imports SGLang.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams

# Routes (http_server.py).
GENERATE = "/generate"
HEALTH = "/health"
HEALTH_GENERATE = "/health_generate"
ABORT_REQUEST = "/abort_request"
FLUSH_CACHE = "/flush_cache"
UPDATE_WEIGHTS_FROM_TENSOR = "/update_weights_from_tensor"
INIT_WEIGHTS_UPDATE_GROUP = "/init_weights_update_group"
DESTROY_WEIGHTS_UPDATE_GROUP = "/destroy_weights_update_group"
UPDATE_WEIGHTS_FROM_DISTRIBUTED = "/update_weights_from_distributed"
RELEASE_MEMORY_OCCUPATION = "/release_memory_occupation"
RESUME_MEMORY_OCCUPATION = "/resume_memory_occupation"
GET_MODEL_INFO = "/get_model_info"
MODEL_INFO = "/model_info"  # newer SGLang's name for /get_model_info
GET_WEIGHT_VERSION = "/get_weight_version"
PAUSE_GENERATION = "/pause_generation"
CONTINUE_GENERATION = "/continue_generation"

# Field names of SGLang's request structs. Every struct derived from BaseReq also carries BASE_REQ_FIELDS.
BASE_REQ_FIELDS = frozenset({"rid", "http_worker_ipc"})
GENERATE_REQ_FIELDS = frozenset(
    {
        "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data",
        "mm_hashes", "mm_content_hashes", "use_audio_in_video", "video_config", "sampling_params",
        "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
        "return_sampling_mask", "return_text_in_logprobs", "return_flat_raw_top_logprobs",
        "return_flat_raw_top_logprobs_b64", "stream", "log_metrics", "return_hidden_states",
        "return_routed_experts", "routed_experts_start_len", "return_indexer_topk", "modalities",
        "session_params", "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides",
        "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size",
        "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank", "kv_router_hint", "routing_key",
        "conversation_id", "http_worker_ipc", "background", "require_reasoning", "max_thinking_tokens",
        "priority", "extra_key", "no_logs", "custom_labels", "return_bytes", "return_entropy",
        "return_prompt_token_ids", "external_trace_header", "received_time", "need_wait_for_mm_inputs",
        "num_items_assigned", "encoder_urls", "max_dynamic_patch", "min_dynamic_patch",
        "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
        "multi_item_delimiter_indices", "cache_salt",
    }
)  # fmt: skip
SAMPLING_PARAMS_FIELDS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
        "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
        "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval", "logit_bias",
        "sampling_seed",
    }
)  # fmt: skip
UPDATE_WEIGHTS_FROM_TENSOR_FIELDS = BASE_REQ_FIELDS | {
    "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
    "disable_draft_model", "torch_empty_cache",
}  # fmt: skip
INIT_WEIGHTS_UPDATE_GROUP_FIELDS = BASE_REQ_FIELDS | {
    "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend",
}  # fmt: skip
DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS = BASE_REQ_FIELDS | {"group_name"}
UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS = BASE_REQ_FIELDS | {
    "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
    "load_format", "torch_empty_cache",
}  # fmt: skip
MEMORY_OCCUPATION_FIELDS = BASE_REQ_FIELDS | {"tags"}  # Release- and ResumeMemoryOccupationReqInput
ABORT_REQ_FIELDS = BASE_REQ_FIELDS | {"abort_all", "finished_reason", "abort_message", "weight_versions"}
PAUSE_GENERATION_FIELDS = BASE_REQ_FIELDS | {"mode"}
CONTINUE_GENERATION_FIELDS = BASE_REQ_FIELDS | {"torch_empty_cache"}
# PauseGenerationReqInput.mode (default "abort"). Every mode holds new requests until /continue_generation.
PAUSE_MODES = ("abort", "retract", "in_place")

# Response fields: /generate (tokenizer_manager.py `_handle_batch_output`), /get_model_info, weight updates.
# weight_versions (newer SGLang, utils/weight_versions.py): [{"version", "start", "end"}] over the output
# tokens, one span per version that generated some of them; weight_version is then the last span's.
GENERATE_RESPONSE_FIELDS = frozenset({"text", "output_ids", "meta_info"})
GENERATE_META_INFO_FIELDS = frozenset(
    {"id", "finish_reason", "prompt_tokens", "weight_version", "weight_versions", "total_retractions",
     "completion_tokens", "cached_tokens", "e2e_latency"}
)  # fmt: skip
LOGPROB_META_INFO_FIELDS = frozenset({"input_token_logprobs", "output_token_logprobs"})
MODEL_INFO_FIELDS = frozenset(
    {"model_path", "tokenizer_path", "is_generation", "preferred_sampling_params", "weight_version"}
)
UPDATE_WEIGHTS_RESPONSE_FIELDS = frozenset({"success", "message"})

DEFAULT_GROUP_NAME = "weight_update_group"  # InitWeightsUpdateGroupReqInput.group_name
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # srt/constants.py GPU_MEMORY_TYPE_*
FLATTENED_BUCKET = "flattened_bucket"  # load_format of a FlattenedTensorBucket payload
# SGLang treats 0 <= temperature < this as greedy (top_k = 1, temperature = 1); top_k at or above TOP_K_ALL
# (and -1) means the whole vocabulary.
GREEDY_TEMPERATURE_EPS = 1e-6
TOP_K_ALL = 1 << 30


class ProtocolError(ValueError):
    """A body that breaks SGLang's schema or asks for something the receiver does not implement."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


# ---------------------------------------------------------------- finish reasons (schedule_batch.py FINISH_*)


def finish_stop(matched_token_id: int) -> dict:
    """FINISH_MATCHED_TOKEN: an EOS or stop token was generated (and is the last output token)."""
    return {"type": FinishReason.STOP.value, "matched": matched_token_id}


def finish_length(length: int) -> dict:
    """FINISH_LENGTH: max_new_tokens (or the context length) was reached."""
    return {"type": FinishReason.LENGTH.value, "length": length}


def finish_abort(message: str) -> dict:
    """FINISH_ABORT without status code: a user abort, answered with HTTP 200 and the partial output."""
    return {"type": FinishReason.ABORT.value, "message": message, "status_code": None, "err_type": None}


def parse_finish_reason(finish: Mapping[str, Any] | None) -> FinishReason:
    if finish is None:
        raise ProtocolError("meta_info.finish_reason", "missing: the request has not finished")
    try:
        return FinishReason(finish["type"])
    except (KeyError, ValueError) as error:
        raise ProtocolError("meta_info.finish_reason", f"unknown finish reason {finish!r}") from error


# ---------------------------------------------------------------- client side: request bodies


def sampling_params_body(params: SamplingParams, sampling_seed: int | None) -> dict:
    """The `sampling_params` dict of a /generate body (n = 1: the client sends one request per sample)."""
    body = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
    }
    if sampling_seed is not None:  # only newer SGLang knows the field: never send it unasked
        body["sampling_seed"] = sampling_seed
    return body


def generate_body(
    input_ids: Sequence[int], params: SamplingParams, rid: str, sampling_seed: int | None
) -> dict:
    """One sample of one prompt, with the log-prob of every generated token and nothing of the prompt."""
    return {
        "rid": rid,
        "input_ids": list(input_ids),
        "sampling_params": sampling_params_body(params, sampling_seed),
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
        "stream": False,
    }


def abort_body(rid: str) -> dict:
    """Abort the request with this rid and those whose rid starts with it (SGLang matches prefixes)."""
    if not rid:
        raise ProtocolError(
            "rid", "an empty rid is a prefix of every rid: use abort_all_body() to abort everything"
        )
    return {"rid": rid, "abort_all": False}


def abort_all_body() -> dict:
    return {"abort_all": True}


def pause_generation_body(mode: str) -> dict:
    """abort: end every request (partial outputs return); retract: requeue the running ones, their KV
    recomputed at continue; in_place: freeze them with their KV. Weight updates then run at once."""
    if mode not in PAUSE_MODES:
        raise ProtocolError("mode", f"{mode!r} is not a pause mode; use one of {PAUSE_MODES}")
    return {"mode": mode}


def update_weights_from_tensor_body(
    serialized_named_tensors: Sequence[str],
    load_format: str | None,
    flush_cache: bool,
    weight_version: int | None,
    abort_all_requests: bool = False,
) -> dict:
    """`serialized_named_tensors` holds one base64 payload per TP rank of the receiving server."""
    return {
        "serialized_named_tensors": list(serialized_named_tensors),
        "load_format": load_format,
        "flush_cache": flush_cache,
        "abort_all_requests": abort_all_requests,
        "weight_version": None if weight_version is None else str(weight_version),
    }


def init_weights_update_group_body(
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str = DEFAULT_GROUP_NAME,
    backend: str = "nccl",
) -> dict:
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


def destroy_weights_update_group_body(group_name: str = DEFAULT_GROUP_NAME) -> dict:
    return {"group_name": group_name}


def update_weights_from_distributed_body(
    names: Sequence[str],
    dtypes: Sequence[str],
    shapes: Sequence[Sequence[int]],
    group_name: str,
    load_format: str | None,
    flush_cache: bool,
    weight_version: int | None,
) -> dict:
    """Tensors follow by broadcast from rank 0 of the group; dtypes are torch names without 'torch.'."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ProtocolError("names", f"{len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
    return {
        "names": list(names),
        "dtypes": list(dtypes),
        "shapes": [list(shape) for shape in shapes],
        "group_name": group_name,
        "load_format": load_format,
        "flush_cache": flush_cache,
        "weight_version": None if weight_version is None else str(weight_version),
    }


def memory_occupation_body(tags: Sequence[str] | None) -> dict:
    """Body of /release_memory_occupation and /resume_memory_occupation; None means every tag."""
    if tags is not None:
        unknown = set(tags) - set(MEMORY_TAGS)
        if unknown:
            raise ProtocolError("tags", f"unknown memory tags {sorted(unknown)}; SGLang knows {MEMORY_TAGS}")
    return {"tags": None if tags is None else list(tags)}


# ---------------------------------------------------------------- client side: responses


def parse_weight_version(value: Any) -> int:
    """SGLang keeps the version as a string ("default" before any update); ours are integers."""
    if value is None or value == "default":
        return 0
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise ProtocolError("weight_version", f"{value!r} is not an integer version") from error


def parse_generate_response(body: Any) -> Completion:
    """One /generate response (a dict, or a list holding one) as a Completion."""
    if isinstance(body, list):
        if len(body) != 1:
            raise ProtocolError("response", f"expected one output, got {len(body)}")
        body = body[0]
    if not isinstance(body, dict) or "meta_info" not in body:
        raise ProtocolError("response", f"not a /generate output: {str(body)[:200]}")
    meta = body["meta_info"]
    finish_reason = parse_finish_reason(meta.get("finish_reason"))
    # An abort before prefill carries no log-probs at all; otherwise one [logprob, token_id, text] per token.
    triples = meta.get("output_token_logprobs") or []
    token_ids = [int(triple[1]) for triple in triples]
    logprobs = [float(triple[0]) for triple in triples]
    output_ids = body.get("output_ids")
    if output_ids is not None and list(output_ids) != token_ids and triples:
        raise ProtocolError("output_ids", "output_ids and output_token_logprobs disagree")
    if not triples and output_ids:
        raise ProtocolError("meta_info.output_token_logprobs", "missing although tokens were generated")
    extras = {
        key: meta[key]
        for key in ("id", "prompt_tokens", "cached_tokens", "e2e_latency", "total_retractions")
        if key in meta
    }
    if "text" in body:
        extras["text"] = body["text"]
    return Completion(
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=finish_reason,
        weight_version=parse_weight_version(meta.get("weight_version")),
        token_weight_versions=parse_weight_version_spans(meta.get("weight_versions"), len(token_ids)),
        meta=extras,
    )


def parse_weight_version_spans(spans: Any, num_tokens: int) -> list[int]:
    """The version of each output token from meta_info.weight_versions (spans in token order, `end`
    exclusive); [] from a server that reports none."""
    if spans is None:
        return []
    versions: list[int] = []
    try:
        for span in spans:
            if span["start"] != len(versions) or span["end"] < span["start"]:
                raise ProtocolError("meta_info.weight_versions", f"span {span} does not follow the last one")
            versions += [parse_weight_version(span["version"])] * (span["end"] - span["start"])
    except (KeyError, TypeError) as error:
        raise ProtocolError("meta_info.weight_versions", f"not a list of spans: {spans!r}") from error
    if len(versions) != num_tokens:
        raise ProtocolError("meta_info.weight_versions", f"cover {len(versions)} of {num_tokens} tokens")
    return versions


def parse_success_response(body: Any, route: str) -> str:
    """The message of a {"success", "message"} answer; raise unless it succeeded."""
    if not isinstance(body, dict) or body.get("success") is not True:
        raise ProtocolError(route, f"the server reported failure: {body}")
    return str(body.get("message", ""))
