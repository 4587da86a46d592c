"""`dapo-report RUN_DIR [RUN_DIR ...] --out report.png`: the training curves of one or more runs in one PNG.

Runs are overlaid, one colour per run; the drawing is megatron_dapo/trainer/report.py.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from megatron_dapo.errors import exit_on_user_error
from megatron_dapo.trainer.report import render_report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dapo-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories to draw")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="PNG to write")
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        if not run_dir.is_dir():
            parser.error(f"{run_dir} is not a directory")
    with exit_on_user_error("dapo-report", ValueError):  # ValueError: a metrics file that is not JSON lines
        print(render_report(args.run_dirs, args.out))


if __name__ == "__main__":
    main()
