"""The single-process torch_dist reader/writer, Hugging Face directory helpers and checkpoint metadata."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_dapo.checkpoint.hf_dir import SafetensorsDir, copy_assets, write_safetensors
from megatron_dapo.checkpoint.meta import CheckpointMeta, read_meta, write_meta
from megatron_dapo.checkpoint.torch_dist import CheckpointReader, Placement, write_checkpoint


def test_torch_dist_round_trip_computes_each_tensor_once(tmp_path):
    gen = torch.Generator().manual_seed(0)
    placements = [Placement("emb", (8, 6), num_chunks=2)]
    placements += [
        Placement("layers.w", (6, 4), layer=i, num_layers=3, split_dim=1, num_chunks=4) for i in range(3)
    ]
    placements += [Placement("layers.norm", (4,), layer=i, num_layers=3) for i in range(3)]
    tensors = {p: torch.randn(p.shape, generator=gen) for p in placements}
    computed = []

    def compute(p: Placement) -> torch.Tensor:
        computed.append(p)
        return tensors[p]

    write_checkpoint(tmp_path, placements, compute, lambda p: torch.float32)
    assert computed == placements  # in plan order, each once: one tensor in memory at a time
    reader = CheckpointReader(tmp_path)
    assert tuple(reader.tensor_metadata("layers.w").size) == (3, 6, 4)
    assert len(reader.tensor_metadata("layers.w").chunks) == 12
    for p in placements:
        assert torch.equal(reader.read(p.key, p.layer), tensors[p]), p
    whole = reader.read("layers.norm")
    assert torch.equal(whole, torch.stack([tensors[p] for p in placements[-3:]]))
    with pytest.raises(KeyError, match="'missing' is missing from the checkpoint"):
        reader.read("missing")


def test_torch_dist_refuses_uneven_chunks_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="3 chunks do not divide dim 0"):
        Placement("x", (8,), num_chunks=3).chunks()
    with pytest.raises(FileNotFoundError, match="not a torch_dist checkpoint"):
        CheckpointReader(tmp_path)


def test_write_safetensors_shards_by_size_with_index(tmp_path):
    tensors = [(f"t{i}", torch.full((250,), float(i))) for i in range(5)]  # 1000 bytes each in float32
    count, nbytes = write_safetensors(tmp_path, iter(tensors), max_shard_bytes=2000, dtype=None)
    assert (count, nbytes) == (5, 5000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5000
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    for name, tensor in tensors:
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)
    assert not list(tmp_path.glob("*.partial"))

    single = tmp_path / "single"
    single.mkdir()
    write_safetensors(single, iter(tensors), max_shard_bytes=10**6, dtype=torch.bfloat16)
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    assert load_file(single / "model.safetensors")["t3"].dtype == torch.bfloat16


def test_safetensors_dir_reads_headers_and_reports_missing_shards(tmp_path):
    save_file({"a": torch.randn(2, 3)}, str(tmp_path / "one.safetensors"))
    save_file({"b": torch.randn(4).bfloat16()}, str(tmp_path / "two.safetensors"))
    weight_map = {"a": "one.safetensors", "b": "two.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    weights = SafetensorsDir(tmp_path)
    assert sorted(weights.names) == ["a", "b"]
    assert weights.shape("a") == (2, 3) and weights.dtype("b") == torch.bfloat16
    assert weights.get("b").shape == (4,)
    with pytest.raises(KeyError, match="'c' is missing"):
        weights.get("c")
    (tmp_path / "two.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        SafetensorsDir(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "one.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        SafetensorsDir(tmp_path)


def test_meta_and_assets(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in (
        "config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "model.safetensors",
        "pytorch_model.bin",
    ):
        (hf / name).write_text("{}")
    assert copy_assets(hf, tmp_path / "copy") == ["chat_template.jinja", "config.json", "tokenizer.json"]

    ckpt = tmp_path / "ckpt"
    with pytest.raises(FileNotFoundError, match="not written by megatron-dapo"):
        read_meta(ckpt)
    meta = CheckpointMeta(tensor_parallel=2, pipeline_parallel=4, padded_vocab_size=256, dtype="bfloat16")
    write_meta(ckpt, meta, hf)
    assert read_meta(ckpt) == meta
    assert (ckpt / "hf" / "tokenizer.json").is_file() and not (ckpt / "hf" / "model.safetensors").exists()
    record = json.loads((ckpt / "dapo_checkpoint.json").read_text())
    (ckpt / "dapo_checkpoint.json").write_text(json.dumps({**record, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        read_meta(ckpt)
    (hf / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        write_meta(tmp_path / "other", meta, hf)
