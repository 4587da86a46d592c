"""`python -m megatron_dapo.cli.warm_start`: warm-start the CPU demo's tiny model now (megatron_dapo/demo/
warm_start.py), or find it in the cache; prints its directory and what it measured."""

import argparse
from collections.abc import Sequence
from pathlib import Path

from megatron_dapo.demo.warm_start import METADATA_FILE, WarmStartSettings, warm_start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Warm-start the CPU demo's tiny model (cached by settings).")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/demo_cache"))
    parser.add_argument("--sft-steps", type=int, default=WarmStartSettings.sft_steps)
    args = parser.parse_args(argv)
    directory = warm_start(args.cache_dir, WarmStartSettings(sft_steps=args.sft_steps))
    print(directory)
    print((directory / METADATA_FILE).read_text())


if __name__ == "__main__":
    main()
