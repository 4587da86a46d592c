"""What a Megatron checkpoint directory of this project records beside megatron's own files.

    CKPT_DIR/dapo_checkpoint.json   TP/PP it was saved with, padded vocabulary, dtype, megatron-core release
    CKPT_DIR/hf/                    the Hugging Face config.json, tokenizer and generation config

so that converting back to Hugging Face, resuming training and serving need nothing but the directory.
"""

import json
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

from megatron_dapo.checkpoint.hf_dir import copy_assets, read_config

META_FILE = "dapo_checkpoint.json"
HF_ASSETS_DIR = "hf"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    tensor_parallel: int  # TP size the checkpoint was written at (it loads at any TP)
    pipeline_parallel: int  # PP size likewise
    padded_vocab_size: int  # rows of the stored embedding / output layer; the true size is in hf/config.json
    dtype: str  # torch dtype name of the stored model tensors
    # The megatron-core release whose dist_checkpointing.save wrote the tensors. None: the conversion tools
    # wrote them (checkpoint/torch_dist.py: a layout every release reads), or the field postdates the save.
    megatron_core: str | None = None


def write_meta(ckpt_dir: Path, meta: CheckpointMeta, hf_dir: Path) -> None:
    """Record `meta` and copy config.json and the tokenizer files of `hf_dir` into the checkpoint."""
    read_config(hf_dir)  # fail now, not at conversion back, when config.json is missing
    copy_assets(hf_dir, Path(ckpt_dir) / HF_ASSETS_DIR)
    record = {"format_version": FORMAT_VERSION, **asdict(meta)}
    (Path(ckpt_dir) / META_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_meta(ckpt_dir: Path) -> CheckpointMeta:
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} was not written by megatron-dapo "
            "(tools/convert_hf_to_megatron.py or the trainer), so its Hugging Face config is unknown"
        )
    record = json.loads(path.read_text())
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {record.get('format_version')}, this code reads {FORMAT_VERSION}"
        )
    record.pop("format_version")
    return CheckpointMeta(**record)


def installed_megatron_core() -> str:
    return version("megatron-core")


def check_megatron_core(ckpt_dir: Path) -> None:
    """Refuse a checkpoint saved by a newer megatron-core release (major.minor) than the installed one, whose
    loader may not read it (0.18 and older cannot read 0.19's), naming the ways through."""
    saved, installed = read_meta(ckpt_dir).megatron_core, installed_megatron_core()
    if saved is None or Version(saved).release[:2] <= Version(installed).release[:2]:
        return
    raise ValueError(
        f"{ckpt_dir} was saved by megatron-core {saved}, newer than the installed {installed}, which may "
        f"not read it: rewrite its weights in a layout every release reads, with `dapo-reshard {ckpt_dir} "
        f"OUT_DIR` (Megatron) or `dapo-convert-megatron-to-hf {ckpt_dir} OUT_DIR` (Hugging Face, for "
        f"model.hf_path), or upgrade with `pip install 'megatron-core>={saved}'`"
    )


def hf_assets_dir(ckpt_dir: Path) -> Path:
    """The checkpoint's Hugging Face config and tokenizer directory (loadable with from_pretrained)."""
    return Path(ckpt_dir) / HF_ASSETS_DIR
