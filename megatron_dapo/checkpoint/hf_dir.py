"""Hugging Face model directories: safetensors weights read one tensor at a time and written in size-capped
shards, and the non-weight files (config.json, tokenizer, generation config) copied alongside."""

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_dapo.errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files of a Hugging Face directory that hold weights; everything else (config, tokenizer, chat template,
# generation config, license) travels with a converted checkpoint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = (INDEX_FILE, "pytorch_model.bin.index.json")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory needs its config.json")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is an error naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def config_dtype(config: dict) -> torch.dtype | None:
    """The dtype config.json declares (`dtype` in transformers 5, `torch_dtype` before), if any."""
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) else None


class SafetensorsDir:
    """The weights of a Hugging Face directory, read one tensor at a time.

    Each read opens its file anew: safetensors memory-maps the file while it is open, and pages touched
    through a long-lived map would stay resident, so the process would grow to the model's size.
    """

    def __init__(self, hf_dir: Path):
        self.hf_dir = Path(hf_dir)
        self.file_of: dict[str, Path] = {}
        self._headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in self._weight_files():
            for name, (shape, dtype) in _read_header(file).items():
                self.file_of[name] = file
                self._headers[name] = (shape, dtype)

    def _weight_files(self) -> list[Path]:
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"{index}: expected a weight_map object of tensor name -> file name")
            files = sorted({self._inside(index, name) for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"missing shard(s) {', '.join(missing)} listed in {index}: the download is incomplete"
                )
            return files
        single = self.hf_dir / SINGLE_FILE
        if single.is_file():
            return [single]
        other = sorted(p.name for p in self.hf_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(other)}: re-save the model with safe_serialization=True)" if other else ""
        raise FileNotFoundError(
            f"no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}) in {self.hf_dir}{hint}"
        )

    def _inside(self, index: Path, name: str) -> Path:
        """A file the index names, refused when its name leads outside the model directory (`../x`, `/x`).
        Judged on the name, not on where symlinks lead: the hub's cache links every file to a blob."""
        relative = Path(os.path.normpath(name))
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise UserError(f"{index}: weight file {name!r} lies outside {self.hf_dir}: refusing to read it")
        return self.hf_dir / relative

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[self._check(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[self._check(name)][1]

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[self._check(name)]
        try:
            with safe_open(file, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise UserError(f"{file}: cannot read tensor {name} ({error})") from None

    def _check(self, name: str) -> str:
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} is missing from the safetensors weights in {self.hf_dir}")
        return name


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each tensor of a safetensors file; a damaged or truncated file is named."""
    try:
        with safe_open(file, framework="pt") as f:
            views = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 - not a mapping
            header = {name: (tuple(v.get_shape()), v.get_dtype()) for name, v in views.items()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{file}: not a readable safetensors file ({error})") from None
    for name, (_, dtype) in header.items():
        if dtype not in _DTYPES:
            raise UserError(f"{file}: tensor {name} has unsupported dtype {dtype}")
    return {name: (shape, _DTYPES[dtype]) for name, (shape, dtype) in header.items()}


def write_safetensors(
    out_dir: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
    dtype: torch.dtype | None,
) -> tuple[int, int]:
    """Write (name, tensor) pairs as safetensors shards of at most `max_shard_bytes` (one bigger tensor is
    a shard of its own), with an index when there is more than one; holds one shard in memory.

    Returns (number of tensors, total bytes).
    """
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map, total_bytes, count = 0, [], {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = out_dir / f"model-{len(files) + 1:05d}.safetensors.partial"
            save_file(shard, str(path), metadata={"format": "pt"})
            files.append(path)
            weight_map.update(dict.fromkeys(shard, path))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        tensor = (tensor if dtype is None else tensor.to(dtype)).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += nbytes
        total_bytes += nbytes
        count += 1
    flush()

    # Final names need the shard count, known only now.
    if len(files) == 1:
        final = {files[0]: out_dir / SINGLE_FILE}
    else:
        final = {
            f: out_dir / f"model-{i:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files, 1)
        }
    for partial, path in final.items():
        partial.rename(path)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": total_bytes},
            "weight_map": {name: final[path].name for name, path in weight_map.items()},
        }
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return count, total_bytes


def copy_assets(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy the non-weight files of a Hugging Face directory (config, tokenizer, ...); returns their names."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(Path(src_dir).iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _WEIGHT_INDEXES:
            shutil.copy2(path, dst_dir / path.name)
            copied.append(path.name)
    return copied
