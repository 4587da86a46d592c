"""The CPU demo: a tiny Qwen2 model learns arithmetic with DAPO, start to finish on a laptop.

Its task (arithmetic.py), character tokenizer (tokenizer.py), warm start (warm_start.py) and run (run.py);
the command line is megatron_dapo/cli/demo.py.
"""
