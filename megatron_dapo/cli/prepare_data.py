"""dapo-prepare-data: convert a data set shipped with the package (offline), a local file, or (--from-hub)
DAPO-Math-17k or AIME 2024 fetched from the Hugging Face hub, into the project's canonical layout.

The layout and the conversion: megatron_dapo/data/prepare.py.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_dapo.data.catalog import DATASETS, dataset_file, describe_missing
from megatron_dapo.data.dataset import handle_bad_rows
from megatron_dapo.data.prepare import DEFAULT_ID_KEY, HUB_SOURCES, convert, download, report, write_rows
from megatron_dapo.errors import UserError, exit_on_user_error


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dapo-prepare-data", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        required=True,
        help=f"a local .parquet/.jsonl file or a shipped data set ({', '.join(DATASETS)})",
    )
    parser.add_argument(
        "--from-hub",
        action="store_true",
        help=f"download --source ({', '.join(HUB_SOURCES)}) from the Hugging Face hub, not the shipped copy",
    )
    parser.add_argument("--out", required=True, type=Path, help="output file, .parquet or .jsonl")
    parser.add_argument("--format", default="auto", help="input layout, as data.format (default: detected)")
    parser.add_argument("--prompt-key", help="dotted column path of the prompt, overriding the layout's")
    parser.add_argument("--answer-key", help="dotted column path of the answer, overriding the layout's")
    parser.add_argument("--id-key", default=DEFAULT_ID_KEY, help="dotted column path of the problem id")
    parser.add_argument("--on-bad-row", choices=("skip", "error"), default="skip")
    parser.add_argument("--cache-dir", help="Hugging Face cache directory for downloads")
    parser.add_argument("--max-listed", type=int, default=20, help="bad rows and conflicts listed at most")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error("dapo-prepare-data"):
        if args.out.suffix not in (".parquet", ".jsonl"):
            raise UserError(f"--out must end in .parquet or .jsonl, got {args.out}")
        if args.from_hub:
            if args.source not in HUB_SOURCES:
                known = ", ".join(HUB_SOURCES)
                raise UserError(f"--from-hub: --source must be one of {known}, got {args.source!r}")
            path = download(args.source, args.cache_dir)
        else:
            path = dataset_file(args.source)
            if not path.is_file():
                raise UserError(f"--source: {describe_missing(args.source)}")
        conversion = convert(
            path,
            layout=args.format,
            prompt_key=args.prompt_key,
            answer_key=args.answer_key,
            id_key=args.id_key,
        )
        handle_bad_rows(
            conversion.bad_rows,
            on_bad_row=args.on_bad_row,
            source=str(path),
            total_rows=conversion.rows_read,
            max_reported=args.max_listed,
        )
    write_rows(conversion.rows, args.out)
    print(report(conversion, args.max_listed), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
