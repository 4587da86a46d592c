"""`python -m megatron_dapo.demo`, as the README runs it: dapo-demo (megatron_dapo/cli/demo.py)."""

from megatron_dapo.cli.demo import main

main()
