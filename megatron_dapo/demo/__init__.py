"""The CPU demo: a tiny Qwen2 model learns arithmetic with DAPO, start to finish on a laptop."""


def main(argv: list[str] | None = None) -> None:
    """`dapo-demo` (demo/run.py); imported on call, so that the warm start runs without the trainer loaded."""
    from megatron_dapo.demo.run import main as run_main

    run_main(argv)
