"""Convert Hugging Face checkpoints to Megatron torch_dist checkpoints and back, and reshard to another TP/PP
(the command lines: cli/convert.py).

All three run in ONE process and move one tensor at a time (checkpoint/torch_dist.py): memory stays near the
largest tensor (plus one output shard when writing Hugging Face files), whatever the model size. Names and
layouts come from model/hf_mapping.py, the mapping weight sync uses too. Output appears atomically: it is
written next to OUT_DIR and renamed into place once complete.
"""

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_dapo.checkpoint.hf_dir import (
    SafetensorsDir,
    config_dtype,
    copy_assets,
    read_config,
    write_safetensors,
)
from megatron_dapo.checkpoint.meta import CheckpointMeta, hf_assets_dir, read_meta, write_meta
from megatron_dapo.checkpoint.torch_dist import CheckpointReader, Placement, write_checkpoint
from megatron_dapo.model.arch import GPTArch, padded_vocab_size
from megatron_dapo.model.hf_mapping import (
    HF_EMBEDDING,
    HF_HEAD,
    HFMapping,
    Layout,
    TensorMap,
    checkpoint_key,
    pad_vocab,
    strip_vocab,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' historical default


@dataclass(frozen=True)
class Summary:
    tensors: int
    bytes: int
    seconds: float
    out_dir: Path

    def __str__(self) -> str:
        rate = self.bytes / max(self.seconds, 1e-9)
        return (
            f"wrote {self.tensors} tensors, {_size(self.bytes)} in {self.seconds:.1f} s ({_size(rate)}/s) "
            f"to {self.out_dir}"
        )


# ---- the three conversions ----------------------------------------------------------------------------


def hf_to_megatron(
    hf_dir: Path,
    out_dir: Path,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Summary:
    """Hugging Face safetensors -> Megatron torch_dist checkpoint laid out for TP=`tp`, PP=`pp`.

    `dtype` defaults to config.json's dtype, else each tensor's stored dtype.
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    mapping = HFMapping(GPTArch.from_hf_config(config))
    mapping.dims.check_parallel(tp, pp)
    weights = SafetensorsDir(hf_dir)
    _check_hf_weights(mapping, weights)
    dtype = dtype or config_dtype(config)
    padded = padded_vocab_size(mapping.dims.vocab_size, tp)

    def compute(entry: TensorMap) -> torch.Tensor:
        hf_tensors = [weights.get(name) for name in entry.hf]
        return mapping.to_megatron(entry, hf_tensors, padded_vocab_size=padded, dtype=dtype)[0]

    def dtype_of(entry: TensorMap) -> torch.dtype:
        return dtype or weights.dtype(entry.hf[0])

    with _output_dir(Path(out_dir), overwrite, source=hf_dir) as tmp:
        tensors, nbytes = _write_megatron(
            tmp, mapping, tp, padded, compute, dtype_of, f"HF -> Megatron TP={tp} PP={pp}"
        )
        stored = dtype_of(mapping.tensors[0])
        write_meta(tmp, CheckpointMeta(tp, pp, padded, _dtype_name(stored)), hf_dir)
    return Summary(tensors, nbytes, time.perf_counter() - start, Path(out_dir))


def megatron_to_hf(
    ckpt_dir: Path,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Summary:
    """Megatron torch_dist checkpoint (any TP/PP; converted, or saved by the trainer) -> Hugging Face dir.

    `dtype` defaults to the checkpoint's stored dtype. Writes safetensors shards of at most `max_shard_bytes`
    (with model.safetensors.index.json when there are several), config.json and the tokenizer files.
    """
    start = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    mapping, reader = _open_megatron(ckpt_dir)

    def hf_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for entry in tqdm(mapping.tensors, desc="Megatron -> HF", unit="tensor", disable=None):
            yield from mapping.to_hf(entry, [reader.read(checkpoint_key(entry), entry.layer)], dtype=dtype)

    stored = reader.tensor_metadata(checkpoint_key(mapping.tensors[0])).properties.dtype
    with _output_dir(Path(out_dir), overwrite, source=ckpt_dir) as tmp:
        tensors, nbytes = write_safetensors(tmp, hf_tensors(), max_shard_bytes, dtype)
        copy_assets(hf_assets_dir(ckpt_dir), tmp)
        config = read_config(hf_assets_dir(ckpt_dir))
        dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[dtype_key] = _dtype_name(dtype or stored)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Summary(tensors, nbytes, time.perf_counter() - start, Path(out_dir))


def reshard(
    ckpt_dir: Path,
    out_dir: Path,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Summary:
    """Megatron torch_dist checkpoint -> the same weights laid out for TP=`tp`, PP=`pp` (vocab re-padded)."""
    start = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    mapping, reader = _open_megatron(ckpt_dir)
    mapping.dims.check_parallel(tp, pp)
    padded = padded_vocab_size(mapping.dims.vocab_size, tp)

    def compute(entry: TensorMap) -> torch.Tensor:
        tensor = reader.read(checkpoint_key(entry), entry.layer)
        if entry.layout is Layout.VOCAB:
            tensor = pad_vocab(strip_vocab(tensor, mapping.dims.vocab_size), padded)
        return tensor if dtype is None else tensor.to(dtype)

    def dtype_of(entry: TensorMap) -> torch.dtype:
        return dtype or reader.tensor_metadata(checkpoint_key(entry)).properties.dtype

    with _output_dir(Path(out_dir), overwrite, source=ckpt_dir) as tmp:
        tensors, nbytes = _write_megatron(
            tmp, mapping, tp, padded, compute, dtype_of, f"reshard to TP={tp} PP={pp}"
        )
        stored = dtype_of(mapping.tensors[0])
        write_meta(tmp, CheckpointMeta(tp, pp, padded, _dtype_name(stored)), hf_assets_dir(ckpt_dir))
    return Summary(tensors, nbytes, time.perf_counter() - start, Path(out_dir))


# ---- pieces -------------------------------------------------------------------------------------------


def _placement(mapping: HFMapping, entry: TensorMap, tp: int, padded_vocab: int) -> Placement:
    """Where megatron-core's GPTModel at TP=`tp` keeps `entry` in a torch_dist checkpoint, chunk by chunk.

    Chunks follow each TP rank's shard: dim 1 for row-parallel layers, dim 0 otherwise; fc1 is two chunks per
    rank ([gate; up] halves stored as one global [gate; up] tensor), norms a single replicated chunk.
    """
    chunks = {Layout.REPLICATED: 1, Layout.GATE_UP: 2 * tp}.get(entry.layout, tp)
    return Placement(
        key=checkpoint_key(entry),
        shape=mapping.megatron_shape(entry, padded_vocab),
        layer=entry.layer,
        num_layers=mapping.dims.num_layers,
        split_dim=1 if entry.layout is Layout.ROW else 0,
        num_chunks=chunks,
    )


def _write_megatron(
    out_dir: Path,
    mapping: HFMapping,
    tp: int,
    padded: int,
    compute: Callable[[TensorMap], torch.Tensor],
    dtype_of: Callable[[TensorMap], torch.dtype],
    desc: str,
) -> tuple[int, int]:
    """Write every tensor of `mapping` as a torch_dist checkpoint; returns (tensors, bytes)."""
    entries = {_placement(mapping, entry, tp, padded): entry for entry in mapping.tensors}
    nbytes = 0
    with tqdm(total=len(entries), desc=desc, unit="tensor", disable=None) as bar:

        def compute_placement(p: Placement) -> torch.Tensor:
            nonlocal nbytes
            tensor = compute(entries[p])
            nbytes += tensor.numel() * tensor.element_size()
            bar.update()
            return tensor

        write_checkpoint(out_dir, list(entries), compute_placement, lambda p: dtype_of(entries[p]))
    return len(entries), nbytes


def _check_hf_weights(mapping: HFMapping, weights: SafetensorsDir) -> None:
    """Every tensor config.json implies is present with its shape, and nothing else is: before writing."""
    for name in weights.names:
        mapping.for_hf(name)  # raises on a tensor the architecture does not have
    _check_tied_head(mapping, weights)
    for entry in mapping.tensors:
        for name, shape in zip(entry.hf, mapping.hf_shapes(entry), strict=True):
            if name not in weights.file_of:
                raise ValueError(
                    f"config/weights mismatch: tensor {name} is missing from {weights.hf_dir} "
                    f"(model_type={mapping.dims.model_type}, {mapping.dims.num_layers} layers in config.json)"
                )
            if weights.shape(name) != shape:
                raise ValueError(
                    f"config/weights mismatch: {name} has shape {weights.shape(name)} in the weights, "
                    f"config.json implies {shape}"
                )


def _check_tied_head(mapping: HFMapping, weights: SafetensorsDir) -> None:
    """With tie_word_embeddings the output layer is the embedding, so a stored lm_head.weight is dropped:
    fine when it is a copy of the embedding, an error when it differs (the model would change)."""
    if not mapping.dims.tie_word_embeddings or HF_HEAD not in weights.file_of:
        return
    head, embedding = weights.get(HF_HEAD), weights.get(HF_EMBEDDING)
    if head.shape != embedding.shape or not torch.equal(head, embedding):
        raise ValueError(
            f"{weights.file_of[HF_HEAD]}: config.json sets tie_word_embeddings=true but {HF_HEAD} differs "
            f"from {HF_EMBEDDING}: set tie_word_embeddings=false to keep the head, or drop {HF_HEAD}"
        )


def _open_megatron(ckpt_dir: Path) -> tuple[HFMapping, CheckpointReader]:
    """The mapping from the checkpoint's own config.json, and a reader; shapes checked against the config."""
    read_meta(ckpt_dir)
    mapping = HFMapping(GPTArch.from_hf_config(read_config(hf_assets_dir(ckpt_dir))))
    reader = CheckpointReader(ckpt_dir)
    for entry in mapping.tensors:
        key = checkpoint_key(entry)
        stored = tuple(reader.tensor_metadata(key).size)
        expected = mapping.megatron_shape(entry, stored[0] if entry.layout is Layout.VOCAB else None)
        if entry.layer is not None:
            expected = (mapping.dims.num_layers, *expected)
        if stored != expected or (entry.layout is Layout.VOCAB and stored[0] < mapping.dims.vocab_size):
            raise ValueError(
                f"config/weights mismatch: checkpoint tensor {key} has shape {stored}, "
                f"{hf_assets_dir(ckpt_dir) / 'config.json'} implies {expected}"
            )
    return mapping, reader


@contextlib.contextmanager
def _output_dir(out_dir: Path, overwrite: bool, source: Path) -> Iterator[Path]:
    """A fresh directory beside `out_dir` to write into, renamed to `out_dir` once the body succeeds."""
    out_dir, source = out_dir.resolve(), source.resolve()
    if out_dir == source or out_dir in source.parents:
        raise ValueError(f"output directory {out_dir} would overwrite the input {source}: choose another one")
    if source in out_dir.parents:
        raise ValueError(f"output directory {out_dir} is inside the input {source}: choose one outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output directory {out_dir} is a file: choose a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out_dir} is not empty: pass --overwrite to replace it")
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left over by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
