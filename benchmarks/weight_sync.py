"""Weight sync on CPU: a full sync of a Megatron model into a real CPU engine process, against a memory copy.

The model (a Qwen2 of a few hundred MB in the engine's dtype) is built by the project's builder at TP=1/PP=1
in this process; the CPU engine runs as its own process, started from a Hugging Face checkpoint of the same
shapes. Each sync goes the whole way: Hugging Face layout, buckets, a /dev/shm segment per bucket
(rollout/host_payload.py; both load formats carry the same one), HTTP, the engine checking and copying every
tensor into its model. The baseline is `torch.Tensor.copy_` of the same number of bytes, timed in the same
run. Several bucket sizes; the best of `--repeats` syncs of each.

Run: python benchmarks/weight_sync.py [--layers 12] [--hidden 1024] [--bucket-mb 1 8 64 512] [--repeats 3]
"""

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from megatron_dapo.model.build import build_gpt_model
from megatron_dapo.parallel.state import ParallelDims, destroy_parallel, init_parallel
from megatron_dapo.rollout.background import BackgroundLoop
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.sync import sync_weights
from megatron_dapo.sync.report import SyncReport
from megatron_dapo.sync.tensor import TensorTransport

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn-hidden", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="bfloat16", help="the engine's and the sync's"
    )
    parser.add_argument("--bucket-mb", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=3, help="syncs per setting; the fastest is reported")
    parser.add_argument("--engine-threads", type=int, default=1, help="OMP_NUM_THREADS of the engine")
    return parser.parse_args()


def model_config(args: argparse.Namespace) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn_hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        dtype=args.dtype,
    )


def copy_seconds(nbytes: int, repeats: int) -> float:
    """Fastest plain copy of `nbytes` between two buffers that already exist (pages touched first)."""
    source = torch.ones(nbytes, dtype=torch.uint8)
    target = torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    args = parse_args()
    dtype = DTYPES[args.dtype]
    config = model_config(args)
    with tempfile.TemporaryDirectory() as directory:
        hf_dir = Path(directory) / "model"
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(hf_dir)
        spec = ServerSpec(
            model_path=str(hf_dir),
            port=free_port(),
            engine="cpu",
            log_file=str(Path(directory) / "engine.log"),
            extra_args=("--dtype", args.dtype, "--skip-tokenizer-init"),
            env={"OMP_NUM_THREADS": str(args.engine_threads)},
        )
        engine = ServerPool([spec], start_timeout_s=600)
        asyncio.run(engine.start())
        try:
            rows = run_syncs(args, config.to_dict(), dtype, engine.urls, engine.api_key)
        finally:
            engine.stop()
    nbytes = rows[0][1].bytes
    baseline = copy_seconds(nbytes, args.repeats)
    print_table(args, rows, nbytes, baseline)


def run_syncs(
    args: argparse.Namespace, config: dict, dtype: torch.dtype, urls: list[str], api_key: str
) -> list[tuple[int, SyncReport]]:
    """(bucket MB, fastest report) for each bucket size."""
    pg = init_parallel(ParallelDims())
    try:
        model = build_gpt_model(config, ParallelDims(), pg, params_dtype=dtype)
        client = SGLangClient(urls, api_key=api_key)
        rows, version = [], 0
        with BackgroundLoop() as loop:

            def sync(transport: TensorTransport, bucket_mb: int) -> SyncReport:
                nonlocal version
                version += 1
                return sync_weights(
                    model,
                    config,
                    pg,
                    transport,
                    client,
                    loop.loop,
                    weight_version=version,
                    dtype=dtype,
                    bucket_bytes=bucket_mb * 2**20,
                )

            transport = TensorTransport()
            sync(transport, max(args.bucket_mb))  # warm-up: connections, first-touch of the engine
            for bucket_mb in args.bucket_mb:
                reports = [sync(transport, bucket_mb) for _ in range(args.repeats)]
                rows.append((bucket_mb, min(reports, key=lambda r: r.seconds)))
            loop.run(client.close())
        return rows
    finally:
        destroy_parallel()


def print_table(args: argparse.Namespace, rows, nbytes: int, baseline_s: float) -> None:
    print(
        f"\nfull sync of {nbytes / 1e6:.0f} MB ({args.dtype}, {args.layers} layers, hidden {args.hidden}) "
        f"into a CPU engine process; best of {args.repeats}; torch.cuda={torch.cuda.is_available()}"
    )
    copy_rate = nbytes / 1e9 / baseline_s
    print(f"baseline: copy_ of the same bytes: {baseline_s * 1e3:.1f} ms, {copy_rate:.2f} GB/s\n")
    header = f"{'bucket MB':>10}{'buckets':>9}{'seconds':>9}{'GB/s':>8}{'engine s':>10}{'x copy':>8}"
    print(header)
    print("-" * len(header))
    for bucket_mb, report in rows:
        rate = report.bytes / 1e9 / report.seconds
        engine_s = sum(stage.engine_seconds for stage in report.stages)
        slowdown = report.seconds / baseline_s
        print(
            f"{bucket_mb:>10}{report.buckets:>9}{report.seconds:>9.2f}{rate:>8.2f}"
            f"{engine_s:>10.2f}{slowdown:>8.1f}"
        )


if __name__ == "__main__":
    main()
