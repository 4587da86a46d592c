"""The plan as the table `dapo-plan` prints."""

from megatron_dapo.plan.fit import Plan
from megatron_dapo.plan.memory import CHUNK_TOKENS, GIB


def format_plan(plan: Plan) -> str:
    """The human-readable table."""
    lines = [_title(plan), "", *_layout_lines(plan)]
    if plan.stages:
        lines += ["", *_memory_table(plan)]
    if plan.rollout is not None:
        lines += ["", *_rollout_lines(plan)]
    if plan.time is not None:
        lines += ["", *_time_lines(plan)]
    lines += ["", "Assumptions (flags of dapo-plan)", *_assumption_lines(plan), ""]
    lines += [f"warning: {w}" for w in plan.warnings]
    if plan.fits:
        return "\n".join([*lines, "FITS"])
    lines += ["DOES NOT FIT", *(f"  - {problem.what}" for problem in plan.problems)]
    if plan.fixes:
        lines += ["Each of these makes it fit (as config overrides):", *(f"  {fix}" for fix in plan.fixes)]
    else:
        lines.append(
            "Neither a change of parallel sizes, recompute, tokens or SGLang memory, nor 8x the nodes fits."
        )
    return "\n".join(lines)


def _title(plan: Plan) -> str:
    c = plan.cluster
    where = "colocated" if plan.layout.colocated else "on dedicated nodes"
    return (
        f"DAPO plan: {plan.shape.name} ({plan.parameters / 1e9:.2f} B parameters) on {c.nodes} node(s) x "
        f"{c.gpus_per_node} GPUs x {c.gpu_memory_gib:g} GiB, rollout {where}"
    )


def _layout_lines(plan: Plan) -> list[str]:
    lay = plan.layout
    grid = f"TP {lay.tp} x PP {lay.pp} x CP {lay.cp} x DP {lay.dp}"
    lines = [
        "Parallel layout",
        f"  training   {lay.train_gpus} GPUs on {lay.train_nodes} node(s): {grid}, "
        f"sequence parallel {'on' if lay.sequence_parallel else 'off'}",
    ]
    if plan.config.rollout.backend != "sglang":
        return [*lines, "  rollout    the CPU engine (rollout.backend=cpu)"]
    where = (
        "on the training GPUs (memory saver)" if lay.colocated else f"on {plan.cluster.rollout_nodes} node(s)"
    )
    return [*lines, f"  rollout    {lay.servers} SGLang server(s) x TP {lay.server_tp} {where}"]


def _memory_table(plan: Plan) -> list[str]:
    cfg, a = plan.config, plan.assumptions
    shards = plan.layout.dp * plan.layout.cp if a.distributed_optimizer else 1
    recompute = "on" if cfg.model.recompute_activations else "off"
    other_recompute = "off" if cfg.model.recompute_activations else "on"
    chunk = cfg.model.logprob_chunk_tokens
    rows = [
        (f"parameters ({cfg.model.dtype})", "parameter_bytes"),
        (f"gradients ({'fp32' if a.grad_fp32 else cfg.model.dtype})", "gradient_bytes"),
        (f"optimizer: fp32 master + Adam, /{shards}", "optimizer_bytes"),
        (f"activations, recompute {recompute}", "activation_bytes"),
        (f"  (recompute {other_recompute} would be)", "activations_other"),
        (f"log-probs, {f'chunks of {chunk}' if chunk else 'plain path'}", "logprob_bytes"),
        (f"  ({'plain path' if chunk else f'chunks of {CHUNK_TOKENS}'} would be)", "logprobs_other"),
        ("reserve", "reserved_bytes"),
        ("total", "total_bytes"),
    ]
    tokens = cfg.train.tokens_per_microbatch
    lines = [
        f"Memory per GPU, GiB ({tokens:,} tokens per micro-batch, {a.kernels} kernels)",
        f"  {'':44}" + "".join(f"{s.stage + ' stage':>14}" for s in plan.stages),
    ]
    for label, attr in rows:
        lines.append(f"  {label:44}" + "".join(f"{getattr(s, attr) / GIB:14.2f}" for s in plan.stages))
    lines.append(f"  {'GPU memory':44}" + f"{plan.cluster.gpu_memory_gib:14.2f}" * len(plan.stages))
    return lines


def _rollout_lines(plan: Plan) -> list[str]:
    r, lay = plan.rollout, plan.layout
    assert r is not None
    pool_gib = max(r.kv_pool_bytes, 0) / GIB
    full, longest = r.full_length_sequences_per_server, r.longest_sequence_tokens
    fraction = plan.config.rollout.mem_fraction
    lines = [
        f"SGLang, per GPU of a TP-{lay.server_tp} server (rollout.mem_fraction={fraction:g})",
        f"  weights {r.weight_bytes / GIB:.1f} GiB, KV-cache pool {pool_gib:.1f} GiB, "
        f"{r.kv_bytes_per_token / 1024:g} KiB per token",
        f"  {r.tokens_per_server:,} tokens per server: {full:,} concurrent {longest:,}-token sequences "
        f"({full * lay.servers:,} in all), {r.mean_length_sequences_per_server:,} at the mean length",
    ]
    if lay.colocated and plan.stages:
        resident = max(s.resident_bytes for s in plan.stages) / GIB
        sglang = fraction * plan.cluster.gpu_memory_gib
        total = resident + sglang + plan.assumptions.reserved_gib
        lines.append(
            f"  during rollout: training state {resident:.1f} + SGLang {sglang:.1f} + reserve "
            f"{plan.assumptions.reserved_gib:g} = {total:.1f} GiB of {plan.cluster.gpu_memory_gib:g}"
        )
    return lines


def _time_lines(plan: Plan) -> list[str]:
    t, c = plan.time, plan.cluster
    assert t is not None
    steps = plan.config.train.steps
    gpus = c.nodes * c.gpus_per_node
    lines = [
        "Time per RL step (estimate; see the assumptions)",
        f"  rollout   {t.rollout_s:8.0f} s  ({t.generated_tokens / 1e6:.1f} M generated tokens: "
        f"{t.decode_s:.0f} s full, {t.drain_s:.0f} s draining: the longest sample alone)",
        f"  training  {t.training_s:8.0f} s  ({t.trained_tokens / 1e6:.1f} M tokens, "
        f"{t.train_flops_per_token / 1e9:.0f} GFLOP per token with the old-log-prob forward)",
    ]
    if t.weight_sync_s:
        lines.append(f"  weights   {t.weight_sync_s:8.0f} s  (bf16, trainer to the dedicated servers)")
    lines.append(f"  step      {t.step_s:8.0f} s; {_run_length(steps, t.step_s, gpus)}")
    if t.async_s is not None:
        eta = plan.config.rollout.max_staleness
        lines.append(
            f"  async     {t.async_s:8.0f} s  (rollout.max_staleness={eta}: max(decode {t.decode_s:.0f}, "
            f"longest sample {t.longest_s:.0f} / {eta + 1}, training {t.training_s:.0f}) + weights "
            f"{t.weight_sync_s:.0f})"
        )
        lines.append(
            f"            {t.step_s / t.async_s:.2f}x the synchronous step on this split; "
            f"{_run_length(steps, t.async_s, gpus)}"
        )
    return lines


def _run_length(steps: int, step_s: float, gpus: int) -> str:
    hours = steps * step_s / 3600
    return f"{steps} steps: {hours:.0f} h, {hours * gpus:,.0f} GPU-hours"


def _assumption_lines(plan: Plan) -> list[str]:
    a, cfg = plan.assumptions, plan.config
    optimizer = "--distributed-optimizer" if a.distributed_optimizer else "--no-distributed-optimizer"
    grads = "--grad-fp32" if a.grad_fp32 else "--no-grad-fp32"
    derived = "" if a.decode_tokens_per_s_per_gpu else " (32e12 / parameters)"
    unused = "" if cfg.algorithm.dynamic_sampling else " (unused: no dynamic sampling)"
    return [
        f"  --kernels {a.kernels}; {optimizer}; {grads}; --reserved-gib {a.reserved_gib:g}",
        f"  --peak-tflops {a.peak_tflops:g} at --mfu {a.mfu:g}; FLOPs per token: 6N + 6·layers·heads·d·seq",
        f"  --decode-tokens-per-s-per-gpu {a.decode_rate(plan.parameters):,.0f}{derived}; "
        f"--tail-ms-per-token {a.tail_ms_per_token:g}; --weight-sync-gb-per-s {a.weight_sync_gb_per_s:g}",
        *_server_line(plan),
        f"  --mean-prompt-tokens {a.mean_prompt_tokens}; --mean-response-fraction "
        f"{a.mean_response_fraction:g} (of {cfg.rollout.max_response_tokens:,}); "
        f"--kept-group-fraction {a.kept_group_fraction:g}{unused}",
        "  not modelled: weight sync when colocated, evaluation, SGLang's CUDA graphs",
    ]


def _server_line(plan: Plan) -> list[str]:
    """The decode step the two throughput flags imply (plan/decode.py)."""
    if plan.time is None:
        return []
    server, sigma = plan.time.server, plan.assumptions.response_length_sigma
    return [
        f"  a decode step: {1000 * server.step_base_s:.1f} + {1000 * server.step_per_sequence_s:.3f}·n ms "
        f"for n sequences ({server.capacity} full); --response-length-sigma {sigma:g} (log-normal)"
    ]
