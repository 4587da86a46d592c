"""`python -m megatron_dapo.train`, as launch scripts and the README run it: dapo-train, whose code and list
of departures from the paper are in megatron_dapo/cli/train.py."""

from megatron_dapo.cli.train import main

if __name__ == "__main__":
    main()
