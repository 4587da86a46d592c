"""Rollouts: the engine protocol (engine.py), the SGLang HTTP client and launcher, SGLang's payloads
(sglang_protocol.py, weight_payload.py), the CPU engine's host-memory payload (host_payload.py), the CPU
engine that serves the same protocol (cpu_engine/), and an event loop thread for synchronous callers
(background.py). Nothing here imports Megatron or the model: engines run where no training does; the
trainer's side of weight sync is megatron_dapo/sync/."""
