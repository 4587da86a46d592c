"""The model to evaluate: a Hugging Face directory, or a Megatron checkpoint of this project served through a
temporary conversion."""

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from megatron_dapo.checkpoint.meta import META_FILE

logger = logging.getLogger(__name__)


def is_megatron_checkpoint(model: Path) -> bool:
    """True for a Megatron checkpoint of this project, False for a Hugging Face directory, else an error."""
    if (Path(model) / META_FILE).is_file():
        return True
    if (Path(model) / "config.json").is_file():
        return False
    raise FileNotFoundError(
        f"--model {model}: neither a Hugging Face model directory (config.json) nor a Megatron checkpoint "
        f"of this project ({META_FILE})"
    )


@contextlib.contextmanager
def served_model_dir(model: Path) -> Iterator[Path]:
    """A Hugging Face directory of `model`: itself, or a Megatron checkpoint converted to a temporary one
    (deleted on exit)."""
    if not is_megatron_checkpoint(model):
        yield model
        return
    # Imported here: megatron-core takes seconds to load, and only a Megatron checkpoint needs it.
    from megatron_dapo.checkpoint.convert import megatron_to_hf

    with tempfile.TemporaryDirectory(prefix="dapo-eval-") as tmp:
        logger.warning(
            "%s is a Megatron checkpoint: converting it to a temporary Hugging Face directory in %s "
            "(set TMPDIR to put it elsewhere)",
            model,
            tmp,
        )
        logger.info("%s", megatron_to_hf(model, Path(tmp) / "hf"))
        yield Path(tmp) / "hf"
