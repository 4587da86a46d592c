"""Rollouts: the engine protocol (engine.py), the SGLang HTTP client and launcher, SGLang's payloads
(sglang_protocol.py, weight_payload.py) and the CPU engine that serves the same protocol (cpu_engine/)."""
