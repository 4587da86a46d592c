"""Hugging Face model directories: safetensors weights read one tensor at a time and written in size-capped
shards, and the non-weight files (config.json, tokenizer, generation config) copied alongside."""

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    return json.loads(path.read_text())


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
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    view = f.get_slice(name)
                    if view.get_dtype() not in _DTYPES:
                        raise ValueError(
                            f"{file.name}: tensor {name} has unsupported dtype {view.get_dtype()}"
                        )
                    self.file_of[name] = file
                    self._headers[name] = (tuple(view.get_shape()), _DTYPES[view.get_dtype()])

    def _weight_files(self) -> list[Path]:
        index = self.hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.hf_dir / name for name in weight_map.values()})
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

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._headers[self._check(name)][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._headers[self._check(name)][1]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.file_of[self._check(name)], framework="pt") as f:
            return f.get_tensor(name)

    def _check(self, name: str) -> str:
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} is missing from the safetensors weights in {self.hf_dir}")
        return name


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
