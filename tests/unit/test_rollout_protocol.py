"""SGLang's HTTP schema, pinned: field names, normalisation and response shapes of rollout/sglang_protocol.py.

The expected field sets are copied by hand from SGLang's sources (sgl-project/sglang), read at these commits:
  python/sglang/srt/managers/io_struct.py          001067fffe33427bee0ed2f007fb7551a1d76b44
  python/sglang/srt/sampling/sampling_params.py    00c17cafcb9e289d5ca97c50e44ada54e4fd5b03
  python/sglang/srt/entrypoints/http_server.py     0025436eab0556737d615b36a4dd3e1e26e82f3d
  python/sglang/srt/managers/tokenizer_manager.py  _handle_batch_output, detokenize_logprob_tokens (2025)
  python/sglang/srt/managers/schedule_batch.py     fd3907ee4618e96b73ee94d9a836db78efb5d046 (FINISH_*)
  python/sglang/srt/utils/weight_versions.py       19f93835d3f8a0b84485592090245d11de783289 (meta_info spans)
If SGLang renames a field, update the set here first; the module and these tests then disagree until fixed.
"""

import pytest

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.cpu_engine import requests as engine_requests
from megatron_dapo.rollout.types import FinishReason, SamplingParams

# BaseReq (io_struct.py): every request struct but GenerateReqInput inherits these.
SGLANG_BASE_REQ = {"rid", "http_worker_ipc"}
# GenerateReqInput (io_struct.py), every dataclass field.
SGLANG_GENERATE_REQ = {
    "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data",
    "mm_hashes", "mm_content_hashes", "use_audio_in_video", "video_config", "sampling_params",
    "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_sampling_mask",
    "return_text_in_logprobs", "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64", "stream",
    "log_metrics", "return_hidden_states", "return_routed_experts", "routed_experts_start_len",
    "return_indexer_topk", "modalities", "session_params", "lora_path", "lora_id", "custom_logit_processor",
    "positional_embed_overrides", "bootstrap_host", "bootstrap_port", "bootstrap_room",
    "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank", "data_parallel_rank",
    "disagg_prefill_dp_rank", "kv_router_hint", "routing_key", "conversation_id", "http_worker_ipc",
    "background", "require_reasoning", "max_thinking_tokens", "priority", "extra_key", "no_logs",
    "custom_labels", "return_bytes", "return_entropy", "return_prompt_token_ids", "external_trace_header",
    "received_time", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "max_dynamic_patch",
    "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
    "multi_item_delimiter_indices", "cache_salt",
}  # fmt: skip
# SamplingParams (sampling_params.py), the API fields (not the internal stop_strs, is_normalized, ...).
SGLANG_SAMPLING_PARAMS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}  # fmt: skip
SGLANG_UPDATE_WEIGHTS_FROM_TENSOR = SGLANG_BASE_REQ | {
    "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
    "disable_draft_model", "torch_empty_cache",
}  # fmt: skip
SGLANG_INIT_WEIGHTS_UPDATE_GROUP = SGLANG_BASE_REQ | {
    "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"
}  # fmt: skip
SGLANG_DESTROY_WEIGHTS_UPDATE_GROUP = SGLANG_BASE_REQ | {"group_name"}
SGLANG_UPDATE_WEIGHTS_FROM_DISTRIBUTED = SGLANG_BASE_REQ | {
    "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
    "load_format", "torch_empty_cache",
}  # fmt: skip
SGLANG_MEMORY_OCCUPATION = SGLANG_BASE_REQ | {"tags"}  # Release- and ResumeMemoryOccupationReqInput
SGLANG_ABORT_REQ = SGLANG_BASE_REQ | {"abort_all", "finished_reason", "abort_message", "weight_versions"}
SGLANG_PAUSE_GENERATION = SGLANG_BASE_REQ | {"mode"}  # PauseGenerationReqInput
SGLANG_CONTINUE_GENERATION = SGLANG_BASE_REQ | {"torch_empty_cache"}  # ContinueGenerationReqInput
SGLANG_PAUSE_MODES = ("abort", "retract", "in_place")  # Literal[...] of PauseGenerationReqInput.mode
# tokenizer_manager.py _handle_batch_output: the output dict and its meta_info for a generation request.
SGLANG_GENERATE_OUTPUT = {"text", "output_ids", "meta_info"}
SGLANG_META_INFO = {
    "id", "finish_reason", "prompt_tokens", "weight_version", "total_retractions", "completion_tokens",
    "cached_tokens", "e2e_latency",
}  # fmt: skip
# weight_versions.py add_weight_versions_to_meta_info: present when the scheduler reports version spans.
SGLANG_WEIGHT_VERSIONS_META_INFO = {"weight_versions"}
SGLANG_LOGPROB_META_INFO = {"input_token_logprobs", "output_token_logprobs"}  # add_logprob_to_meta_info
SGLANG_MODEL_INFO = {
    "model_path",
    "tokenizer_path",
    "is_generation",
    "preferred_sampling_params",
    "weight_version",
}
# http_server.py routes.
SGLANG_ROUTES = {
    "GENERATE": "/generate", "HEALTH": "/health", "HEALTH_GENERATE": "/health_generate",
    "ABORT_REQUEST": "/abort_request", "FLUSH_CACHE": "/flush_cache",
    "UPDATE_WEIGHTS_FROM_TENSOR": "/update_weights_from_tensor",
    "INIT_WEIGHTS_UPDATE_GROUP": "/init_weights_update_group",
    "DESTROY_WEIGHTS_UPDATE_GROUP": "/destroy_weights_update_group",
    "UPDATE_WEIGHTS_FROM_DISTRIBUTED": "/update_weights_from_distributed",
    "RELEASE_MEMORY_OCCUPATION": "/release_memory_occupation",
    "RESUME_MEMORY_OCCUPATION": "/resume_memory_occupation", "GET_MODEL_INFO": "/get_model_info",
    "MODEL_INFO": "/model_info", "GET_WEIGHT_VERSION": "/get_weight_version",
    "PAUSE_GENERATION": "/pause_generation", "CONTINUE_GENERATION": "/continue_generation",
}  # fmt: skip


def test_schema_field_sets_match_sglang():
    assert protocol.BASE_REQ_FIELDS == SGLANG_BASE_REQ
    assert protocol.GENERATE_REQ_FIELDS == SGLANG_GENERATE_REQ
    assert protocol.SAMPLING_PARAMS_FIELDS == SGLANG_SAMPLING_PARAMS
    assert protocol.UPDATE_WEIGHTS_FROM_TENSOR_FIELDS == SGLANG_UPDATE_WEIGHTS_FROM_TENSOR
    assert protocol.INIT_WEIGHTS_UPDATE_GROUP_FIELDS == SGLANG_INIT_WEIGHTS_UPDATE_GROUP
    assert protocol.DESTROY_WEIGHTS_UPDATE_GROUP_FIELDS == SGLANG_DESTROY_WEIGHTS_UPDATE_GROUP
    assert protocol.UPDATE_WEIGHTS_FROM_DISTRIBUTED_FIELDS == SGLANG_UPDATE_WEIGHTS_FROM_DISTRIBUTED
    assert protocol.MEMORY_OCCUPATION_FIELDS == SGLANG_MEMORY_OCCUPATION
    assert protocol.ABORT_REQ_FIELDS == SGLANG_ABORT_REQ
    assert protocol.GENERATE_RESPONSE_FIELDS == SGLANG_GENERATE_OUTPUT
    assert protocol.GENERATE_META_INFO_FIELDS == SGLANG_META_INFO | SGLANG_WEIGHT_VERSIONS_META_INFO
    assert protocol.PAUSE_GENERATION_FIELDS == SGLANG_PAUSE_GENERATION
    assert protocol.CONTINUE_GENERATION_FIELDS == SGLANG_CONTINUE_GENERATION
    assert protocol.PAUSE_MODES == SGLANG_PAUSE_MODES
    assert protocol.LOGPROB_META_INFO_FIELDS == SGLANG_LOGPROB_META_INFO
    assert protocol.MODEL_INFO_FIELDS == SGLANG_MODEL_INFO
    for name, route in SGLANG_ROUTES.items():
        assert getattr(protocol, name) == route


def test_client_bodies_use_only_sglang_fields():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8, stop_token_ids=(3, 4))
    body = protocol.generate_body([1, 2, 3], params, "req-0", sampling_seed=11)
    assert set(body) == {
        "rid",
        "input_ids",
        "sampling_params",
        "return_logprob",
        "logprob_start_len",
        "stream",
    }
    assert set(body) <= SGLANG_GENERATE_REQ
    assert body["sampling_params"] == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_new_tokens": 8, "stop_token_ids": [3, 4],
        "sampling_seed": 11,
    }  # fmt: skip
    # sampling_seed exists only in newer SGLang: an unseeded request must not send it.
    assert "sampling_seed" not in protocol.generate_body([1], SamplingParams(), "r", None)["sampling_params"]
    assert (
        set(protocol.update_weights_from_tensor_body(["x"], None, True, 3))
        <= SGLANG_UPDATE_WEIGHTS_FROM_TENSOR
    )
    assert protocol.update_weights_from_tensor_body(["x"], None, True, 3)["weight_version"] == "3"
    init = protocol.init_weights_update_group_body("127.0.0.1", 29500, 1, 2)
    assert set(init) == SGLANG_INIT_WEIGHTS_UPDATE_GROUP - SGLANG_BASE_REQ
    distributed = protocol.update_weights_from_distributed_body(
        ["w"], ["float32"], [[2, 3]], "g", None, True, 5
    )
    assert set(distributed) <= SGLANG_UPDATE_WEIGHTS_FROM_DISTRIBUTED
    assert set(protocol.destroy_weights_update_group_body()) <= SGLANG_DESTROY_WEIGHTS_UPDATE_GROUP
    assert set(protocol.memory_occupation_body(["kv_cache"])) <= SGLANG_MEMORY_OCCUPATION
    assert set(protocol.abort_body("r-1")) <= SGLANG_ABORT_REQ
    assert protocol.abort_all_body() == {"abort_all": True}
    for mode in SGLANG_PAUSE_MODES:
        assert protocol.pause_generation_body(mode) == {"mode": mode}


def test_client_body_errors_name_the_field():
    with pytest.raises(protocol.ProtocolError, match=r"^rid:"):
        protocol.abort_body("")
    with pytest.raises(protocol.ProtocolError, match=r"^mode:.*'abort', 'retract', 'in_place'"):
        protocol.pause_generation_body("drain")
    with pytest.raises(protocol.ProtocolError, match=r"^tags:.*gpu"):
        protocol.memory_occupation_body(["gpu"])
    with pytest.raises(protocol.ProtocolError, match=r"^names:"):
        protocol.update_weights_from_distributed_body(["a", "b"], ["float32"], [[1]], "g", None, True, 1)


def test_finish_reasons_are_sglang_json():
    assert protocol.finish_stop(7) == {"type": "stop", "matched": 7}
    assert protocol.finish_length(16) == {"type": "length", "length": 16}
    assert protocol.finish_abort("gone") == {
        "type": "abort",
        "message": "gone",
        "status_code": None,
        "err_type": None,
    }
    for finish, reason in [
        (protocol.finish_stop(1), FinishReason.STOP),
        (protocol.finish_length(1), FinishReason.LENGTH),
        (protocol.finish_abort("x"), FinishReason.ABORT),
    ]:
        assert protocol.parse_finish_reason(finish) is reason
    with pytest.raises(protocol.ProtocolError, match="finish_reason"):
        protocol.parse_finish_reason({"type": "timeout"})
    with pytest.raises(protocol.ProtocolError, match="finish_reason"):
        protocol.parse_finish_reason(None)


def _sglang_output(output_ids, logprobs, finish, weight_version="default"):
    """A /generate answer as SGLang's tokenizer manager writes it (logprob triples with null text)."""
    return {
        "text": "...",
        "output_ids": output_ids,
        "meta_info": {
            "id": "r-0", "finish_reason": finish, "prompt_tokens": 3, "weight_version": weight_version,
            "total_retractions": 0, "completion_tokens": len(output_ids), "cached_tokens": 0,
            "e2e_latency": 0.1,
            "input_token_logprobs": [[None, 5, None]],
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, output_ids, strict=True)],
        },
    }  # fmt: skip


def test_weight_version_spans_cover_the_tokens_in_order():
    def spans(*triples):
        return [{"version": v, "start": a, "end": b} for v, a, b in triples]

    assert protocol.parse_weight_version_spans(spans(("3", 0, 1), ("5", 1, 4)), 4) == [3, 5, 5, 5]
    assert protocol.parse_weight_version_spans(spans(("3", 0, 0)), 0) == []  # an abort before any token
    assert protocol.parse_weight_version_spans(None, 2) == []  # older SGLang: one version per response
    for bad, tokens in [
        (spans(("3", 0, 2)), 3),  # too few tokens covered
        (spans(("3", 0, 1), ("4", 2, 3)), 3),  # a gap
        (spans(("3", 0, 2), ("4", 1, 3)), 3),  # an overlap
        ([{"version": "3"}], 1),
        ("3", 1),
    ]:
        with pytest.raises(protocol.ProtocolError, match=r"^meta_info\.weight_versions:"):
            protocol.parse_weight_version_spans(bad, tokens)


def test_parse_generate_response():
    completion = protocol.parse_generate_response(
        _sglang_output([4, 9], [-0.5, -1.25], {"type": "stop", "matched": 9})
    )
    assert completion.token_ids == [4, 9]
    assert completion.logprobs == [-0.5, -1.25]
    assert completion.finish_reason is FinishReason.STOP
    assert completion.weight_version == 0  # SGLang's "default" before the first update
    assert completion.meta["id"] == "r-0"
    # A list holding one output (SGLang answers lists for batches) and an integer version.
    listed = protocol.parse_generate_response(
        [_sglang_output([1], [-2.0], {"type": "length", "length": 1}, "7")]
    )
    assert listed.weight_version == 7 and listed.finish_reason is FinishReason.LENGTH
    # An abort before prefill: no tokens and no log-probs at all.
    aborted = {
        "text": "",
        "output_ids": [],
        "meta_info": {"id": "r-1", "finish_reason": protocol.finish_abort("x")},
    }
    completion = protocol.parse_generate_response(aborted)
    assert (
        completion.finish_reason is FinishReason.ABORT
        and completion.token_ids == []
        and completion.logprobs == []
    )
    disagreeing = _sglang_output([4, 9], [-0.5, -1.25], {"type": "length", "length": 2})
    disagreeing["output_ids"] = [4, 8]
    with pytest.raises(protocol.ProtocolError, match="output_ids"):
        protocol.parse_generate_response(disagreeing)


def test_engine_output_round_trips_through_the_client_parser():
    output = engine_requests.generate_output(
        rid="r-3",
        output_ids=[5, 6, 7],
        logprobs=[-1.0, -2.0, -0.5],
        token_texts=None,
        text="t5t6",
        finish_reason=protocol.finish_stop(7),
        prompt_tokens=4,
        cached_tokens=4,
        weight_version="12",
        e2e_latency=0.25,
        weight_versions=[{"version": "11", "start": 0, "end": 2}, {"version": "12", "start": 2, "end": 3}],
        retractions=1,
    )
    assert set(output) == SGLANG_GENERATE_OUTPUT
    meta_info_fields = SGLANG_META_INFO | SGLANG_WEIGHT_VERSIONS_META_INFO | SGLANG_LOGPROB_META_INFO
    assert set(output["meta_info"]) == meta_info_fields
    assert output["meta_info"]["output_token_logprobs"][1] == [-2.0, 6, None]
    completion = protocol.parse_generate_response(output)
    assert (completion.token_ids, completion.logprobs) == ([5, 6, 7], [-1.0, -2.0, -0.5])
    assert completion.finish_reason is FinishReason.STOP and completion.weight_version == 12
    assert completion.token_weight_versions == [11, 11, 12] and completion.meta["total_retractions"] == 1
    without_tokenizer = engine_requests.generate_output(
        rid="r", output_ids=[1], logprobs=None, token_texts=None, text=None,
        finish_reason=protocol.finish_length(1), prompt_tokens=1, cached_tokens=0, weight_version="1",
        e2e_latency=0,
    )  # fmt: skip
    assert set(without_tokenizer) == {"output_ids", "meta_info"}
    assert set(without_tokenizer["meta_info"]) == SGLANG_META_INFO
    assert set(engine_requests.model_info_body("/m", None, "3")) == SGLANG_MODEL_INFO


def test_sampling_normalisation_follows_sglang():
    sampling, n = engine_requests.parse_engine_sampling(
        {"temperature": 0.0, "top_k": 50, "max_new_tokens": 4}
    )
    assert (sampling.temperature, sampling.top_k, n) == (1.0, 1, 1)  # greedy runs as T = 1, top_k = 1
    sampling, _ = engine_requests.parse_engine_sampling({"temperature": None, "top_k": -1, "top_p": None})
    assert (sampling.temperature, sampling.top_k, sampling.top_p) == (1.0, None, 1.0)
    sampling, _ = engine_requests.parse_engine_sampling({"top_k": protocol.TOP_K_ALL})
    assert sampling.top_k is None and sampling.max_new_tokens == 128  # SGLang's default length
    sampling, n = engine_requests.parse_engine_sampling(
        {"n": 3, "stop_token_ids": [2, 2, 5], "ignore_eos": True, "sampling_seed": 9, "min_p": 0.0}
    )
    assert (
        n == 3 and sampling.stop_token_ids == {2, 5} and sampling.ignore_eos and sampling.sampling_seed == 9
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"temperature": -0.1}, "sampling_params.temperature"),
        ({"top_p": 0.0}, "sampling_params.top_p"),
        ({"top_k": 0}, "sampling_params.top_k"),
        ({"max_new_tokens": -1}, "sampling_params.max_new_tokens"),
        ({"n": 0}, "sampling_params.n"),
        ({"min_p": 0.1}, "sampling_params.min_p"),
        ({"repetition_penalty": 1.2}, "sampling_params.repetition_penalty"),
        ({"stop": ["\n"]}, "sampling_params.stop"),
        ({"regex": "a+"}, "sampling_params.regex"),
        ({"top_kk": 3}, "sampling_params.top_kk"),
        # Values JSON (and Python's json, which reads NaN) can carry that are not what the field holds.
        ({"top_k": float("nan")}, "sampling_params.top_k"),
        ({"top_k": 2.5}, "sampling_params.top_k"),
        ({"top_k": True}, "sampling_params.top_k"),
        ({"max_new_tokens": True}, "sampling_params.max_new_tokens"),
        ({"max_new_tokens": "8"}, "sampling_params.max_new_tokens"),
        ({"n": True}, "sampling_params.n"),
        ({"sampling_seed": 1.5}, "sampling_params.sampling_seed"),
        ({"stop_token_ids": ["x"]}, "sampling_params.stop_token_ids[0]"),
        ({"stop_token_ids": [3, False]}, "sampling_params.stop_token_ids[1]"),
        ({"stop_token_ids": 7}, "sampling_params.stop_token_ids"),
    ],
)
def test_sampling_errors_name_the_field(body, field):
    with pytest.raises(protocol.ProtocolError) as error:
        engine_requests.parse_engine_sampling(body)
    assert error.value.field == field


def test_generate_request_expands_like_sglang():
    body = {"rid": "g", "input_ids": [[1, 2], [3]], "sampling_params": {"n": 2}, "return_logprob": True}
    items, single = engine_requests.parse_generate_request(body, vocab_size=10)
    assert not single
    # The batch repeats n times: output k is prompt k % batch, with rid "{rid}_{k}".
    assert [(item.rid, item.input_ids) for item in items] == [
        ("g_0", (1, 2)), ("g_1", (3,)), ("g_2", (1, 2)), ("g_3", (3,)),
    ]  # fmt: skip
    items, single = engine_requests.parse_generate_request({"rid": "one", "input_ids": [4, 5]}, vocab_size=10)
    assert single and items[0].rid == "one" and not items[0].return_logprob
    items, single = engine_requests.parse_generate_request(
        {"input_ids": [4], "sampling_params": {"n": 3}}, vocab_size=10
    )
    assert not single and len({item.rid for item in items}) == 3
    metadata = {
        "input_ids": [1],
        "log_metrics": True,
        "priority": 3,
        "custom_labels": {"a": "b"},
        "lora_path": None,
    }
    assert engine_requests.parse_generate_request(metadata, vocab_size=10)[1]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input_ids": [1], "unknown_field": 1}, "generate.unknown_field"),
        ({"text": "hello"}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [1, 99]}, "input_ids[0]"),
        ({"input_ids": [[1], []]}, "input_ids[1]"),
        ({"input_ids": [1], "stream": True}, "stream"),
        ({"input_ids": [1], "logprob_start_len": 0}, "logprob_start_len"),
        ({"input_ids": [1], "top_logprobs_num": 5}, "top_logprobs_num"),
        ({"input_ids": [1], "lora_path": "/adapter"}, "lora_path"),
        ({"input_ids": [1], "sampling_params": [{}]}, "sampling_params"),
        ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid"),
        ({"input_ids": [True, True]}, "input_ids[0]"),  # JSON true is a Python int
        ({"input_ids": [[1], [2, False]]}, "input_ids[1]"),
        ({"input_ids": [1.0, 2]}, "input_ids[0]"),
        ({"input_ids": [1], "sampling_params": {"n": 5}}, "sampling_params.n"),  # more than max_sequences
        ({"input_ids": [[1], [2]], "sampling_params": {"n": 3}}, "input_ids"),  # 2 prompts x 3 > 4
    ],
)
def test_generate_request_errors_name_the_field(body, field):
    with pytest.raises(protocol.ProtocolError) as error:
        engine_requests.parse_generate_request(body, vocab_size=10, max_sequences=4)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("parse", "body", "field"),
    [
        (engine_requests.parse_memory_tags, {"tags": 5}, "tags"),
        (engine_requests.parse_memory_tags, {"tags": [1]}, "tags"),
        (engine_requests.parse_abort_request, {"rid": 5}, "rid"),
        (engine_requests.parse_destroy_weights_update_group, {"group_name": ["g"]}, "group_name"),
        (
            engine_requests.parse_init_weights_update_group,
            {"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1, "world_size": 2},
            "master_port",
        ),
        (
            engine_requests.parse_init_weights_update_group,
            {"master_address": "127.0.0.1", "master_port": 70000, "rank_offset": 1, "world_size": 2},
            "master_port",
        ),
        (
            engine_requests.parse_init_weights_update_group,
            {"master_address": ["h"], "master_port": 1, "rank_offset": 1, "world_size": 2},
            "master_address",
        ),
        (
            engine_requests.parse_update_weights_from_distributed,
            {"names": ["w"], "dtypes": ["float32"], "shapes": [["a"]]},
            "shapes[0]",
        ),
        (
            engine_requests.parse_update_weights_from_distributed,
            {"names": ["w"], "dtypes": ["float32"], "shapes": [3]},
            "shapes",
        ),
    ],
)
def test_control_request_errors_name_the_field(parse, body, field):
    with pytest.raises(protocol.ProtocolError) as error:
        parse(body)
    assert error.value.field == field


def test_control_request_parsers():
    update = engine_requests.parse_update_weights_from_tensor(
        {"serialized_named_tensors": ["abc"], "load_format": "flattened_bucket", "weight_version": "4"}
    )
    assert update.load_format == "flattened_bucket" and not update.abort_all_requests
    assert update.weight_version == "4"
    with pytest.raises(protocol.ProtocolError, match="serialized_named_tensors"):
        engine_requests.parse_update_weights_from_tensor({"serialized_named_tensors": "abc"})
    init = engine_requests.parse_init_weights_update_group(
        protocol.init_weights_update_group_body("h", 1, 1, 2, "g", "gloo")
    )
    assert (init.master_address, init.master_port, init.rank_offset, init.world_size) == ("h", 1, 1, 2)
    with pytest.raises(protocol.ProtocolError, match="master_port"):
        engine_requests.parse_init_weights_update_group(
            {"master_address": "h", "rank_offset": 1, "world_size": 2}
        )
    distributed = engine_requests.parse_update_weights_from_distributed(
        protocol.update_weights_from_distributed_body(["w"], ["bfloat16"], [[2, 3]], "g", None, False, 2)
    )
    assert (distributed.shapes, distributed.dtypes, distributed.weight_version) == (
        [[2, 3]],
        ["bfloat16"],
        "2",
    )
    assert engine_requests.parse_memory_tags(None) == protocol.MEMORY_TAGS
    assert engine_requests.parse_memory_tags({"tags": ["weights"]}) == ("weights",)
    assert engine_requests.parse_abort_request({"abort_all": True}).abort_all
    assert engine_requests.parse_pause_generation(None) == "abort"  # SGLang's default mode
    for mode in SGLANG_PAUSE_MODES:
        assert engine_requests.parse_pause_generation(protocol.pause_generation_body(mode)) == mode
    for body, field in [({"mode": "drain"}, "mode"), ({"mode": None}, "mode"), ({"wait": 1}, "wait")]:
        with pytest.raises(protocol.ProtocolError, match=field):
            engine_requests.parse_pause_generation(body)
    engine_requests.parse_continue_generation({"torch_empty_cache": False})
    with pytest.raises(protocol.ProtocolError, match=r"^continue_generation\.mode:"):
        engine_requests.parse_continue_generation({"mode": "abort"})
    with pytest.raises(protocol.ProtocolError, match=r"^rid:"):
        engine_requests.parse_abort_request({"rid": ""})
    assert protocol.parse_weight_version("default") == 0
    with pytest.raises(protocol.ProtocolError, match="weight_version"):
        protocol.parse_weight_version("v1")
