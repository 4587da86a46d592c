"""Run the CPU engine: `python -m megatron_dapo.rollout.cpu_engine --model-path HF_DIR --port P`.

Takes the core flags of `sglang.launch_server` so the same launcher drives both. /update_weights_from_tensor
reads host-memory payloads (rollout/host_payload.py), never pickles; bind to 127.0.0.1 (the default) anyway.
Sharing cores with a trainer, give it few threads (OMP_NUM_THREADS=1 for small models): on a busy 2-core
machine one decode step of the tests' tiny model took 6 ms with one thread and 320 ms with two.
"""

import argparse
import contextlib
import logging
import os
import random
import sys

import torch
from aiohttp import web
from transformers import GenerationConfig

from megatron_dapo.data.tokenizer import load_tokenizer
from megatron_dapo.rollout.api_key import API_KEY_ENV, api_key_from_env
from megatron_dapo.rollout.cpu_engine.lifeline import exit_with_parent
from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.scheduler import Scheduler
from megatron_dapo.rollout.cpu_engine.server import EngineServer, ServerSettings, is_loopback
from megatron_dapo.rollout.host_payload import DEFAULT_SHM_DIR

logger = logging.getLogger("megatron_dapo.rollout.cpu_engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_dapo.rollout.cpu_engine",
        description="A CPU server speaking SGLang's HTTP protocol: for CI, the CPU demo, runs without GPUs.",
    )
    parser.add_argument("--model-path", required=True, help="Hugging Face model directory")
    parser.add_argument("--tokenizer-path", help="tokenizer directory (default: --model-path)")
    parser.add_argument(
        "--skip-tokenizer-init", action="store_true", help="no tokenizer: outputs carry no text"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address; keep it local unless an API key is set"
    )
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", "--tensor-parallel-size", type=int, default=1, help="must be 1 on CPU")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
        help="float32 by default (SGLang's default is the model's dtype): exact log-probs matter more on CPU",
    )  # fmt: skip
    parser.add_argument("--context-length", type=int, help="default: the model's max_position_embeddings")
    parser.add_argument("--max-running-requests", type=int, default=256, help="sequences decoded together")
    parser.add_argument("--random-seed", type=int, help="seeds requests that carry no sampling_seed")
    parser.add_argument("--weight-version", default="default", help="reported until the first weight update")
    parser.add_argument(
        "--weight-shm-dir", default=DEFAULT_SHM_DIR, help="where the trainer's weight segments are read"
    )
    parser.add_argument(
        "--allow-weight-cast", action="store_true",
        help="cast weight updates of another dtype to --dtype (default: refuse them)",
    )  # fmt: skip
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--api-key",
        help=f"refuse requests without 'Authorization: Bearer KEY' (/health excepted), as SGLang does; "
        f"default: ${API_KEY_ENV}, which keeps the key out of the process list",
    )
    parser.add_argument(
        "--allow-auto-truncate", action="store_true",
        help="SGLang's flag: cap max_new_tokens at the context length instead of refusing the request",
    )  # fmt: skip
    parser.add_argument(
        "--max-request-mib", type=float, default=64, help="largest request body (MiB); larger ones get 413"
    )
    parser.add_argument(
        "--max-sequences-per-request", type=int, default=1024, help="prompts x n of one /generate, at most"
    )
    parser.add_argument(
        "--weight-group-timeout", type=float, default=60.0,
        help="seconds each weight-update broadcast, and each try to reach the trainer's store, may wait "
        "(torch tries twice: an unanswered join ends after about twice this)",
    )  # fmt: skip
    parser.add_argument(
        "--parent-pid", type=int, help="exit, with every process this engine started, when this parent dies"
    )
    # Accepted so that a command line written for sglang.launch_server also starts the CPU engine.
    parser.add_argument("--mem-fraction-static", type=float, help="no effect on CPU")
    parser.add_argument(
        "--enable-memory-saver", action="store_true", help="no effect on CPU (release always works)"
    )
    args = parser.parse_args(argv)
    if args.tp_size != 1:
        parser.error(f"--tp-size {args.tp_size}: the CPU engine runs one process; use --tp-size 1")
    for name in ("max_request_mib", "max_sequences_per_request", "weight_group_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    args.api_key = args.api_key or api_key_from_env()
    if args.random_seed is None:
        args.random_seed = random.randrange(2**31)  # SGLang's default too: a random seed
    return args


def eos_token_ids(model_path: str, config, tokenizer) -> frozenset[int]:
    """The ids SGLang stops on unless ignore_eos: EOS of the model, generation config and tokenizer."""
    ids: set[int] = set()
    sources = [config.eos_token_id]
    with contextlib.suppress(OSError):  # no generation_config.json
        sources.append(GenerationConfig.from_pretrained(model_path).eos_token_id)
    if tokenizer is not None:
        sources.append(tokenizer.eos_token_id)
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(source)
    return frozenset(ids)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    if args.parent_pid is not None:
        exit_with_parent(args.parent_pid)  # first: the parent may die while the model loads
    if not is_loopback(args.host):
        logger.warning(
            "binding to %s: any client reaching this port can update the weights; never expose it%s",
            args.host,
            "" if args.api_key else f" (and no API key is set: set {API_KEY_ENV})",
        )
    elif sys.platform == "linux":  # the sockets of weight-update groups (gloo) stay on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    runner = ModelRunner(args.model_path, DTYPES[args.dtype], args.context_length, args.allow_weight_cast)
    tokenizer_path = None if args.skip_tokenizer_init else (args.tokenizer_path or args.model_path)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    scheduler = Scheduler(
        runner,
        eos_token_ids=eos_token_ids(args.model_path, runner.model.config, tokenizer),
        max_running_requests=args.max_running_requests,
        seed=args.random_seed,
        allow_auto_truncate=args.allow_auto_truncate,
    )
    settings = ServerSettings(
        host=args.host,
        api_key=args.api_key,
        max_request_bytes=int(args.max_request_mib * 2**20),
        max_sequences_per_request=args.max_sequences_per_request,
        weight_group_timeout_s=args.weight_group_timeout,
        weight_shm_dir=args.weight_shm_dir,
    )
    server = EngineServer(
        runner, scheduler, tokenizer, args.model_path, tokenizer_path, args.weight_version, settings
    )
    logger.info("CPU engine serving %s on http://%s:%d", args.model_path, args.host, args.port)
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its sequences.
    web.run_app(
        server.app(), host=args.host, port=args.port, print=None, access_log=None, handler_cancellation=True
    )


if __name__ == "__main__":
    main()
