"""Conversion tools, single process: HF -> Megatron -> HF bit-exactness, resharding, dtypes and user errors.

Loading the converted checkpoints into real GPTModels at several TP/PP, and comparing log-probs with the
Hugging Face model, is in tests/parallel/test_convert_parallel.py.
"""

import argparse
import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_dapo.checkpoint import convert
from megatron_dapo.checkpoint.meta import read_meta
from megatron_dapo.checkpoint.torch_dist import CheckpointReader
from megatron_dapo.cli import convert as convert_cli
from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.hf_mapping import HFMapping, checkpoint_key
from tests.helpers.tiny_models import hf_tensors, save_tiny_hf_model


def megatron_tensors(ckpt_dir: Path) -> dict[tuple[str, int | None], torch.Tensor]:
    reader = CheckpointReader(ckpt_dir)
    mapping = HFMapping(GPTArch.from_hf_config(json.loads((ckpt_dir / "hf" / "config.json").read_text())))
    return {(checkpoint_key(e), e.layer): reader.read(checkpoint_key(e), e.layer) for e in mapping.tensors}


@pytest.mark.parametrize(
    ("model_type", "tie", "shard_size"),
    [("qwen2", False, "40KB"), ("qwen3", True, ""), ("llama", False, "")],
)
def test_hf_megatron_hf_round_trip_is_bit_exact(tmp_path, model_type, tie, shard_size):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", model_type, tie=tie, shard_size=shard_size)
    assert (hf_dir / "model.safetensors.index.json").is_file() == bool(shard_size)

    summary = convert.hf_to_megatron(hf_dir, tmp_path / "megatron", tp=2, pp=2)
    meta = read_meta(tmp_path / "megatron")
    assert (meta.tensor_parallel, meta.pipeline_parallel, meta.padded_vocab_size) == (2, 2, 128)
    assert summary.tensors == len(
        HFMapping(GPTArch.from_hf_config(json.loads((hf_dir / "config.json").read_text()))).tensors
    )

    convert.megatron_to_hf(tmp_path / "megatron", tmp_path / "back", max_shard_bytes=30_000)
    original, back = hf_tensors(hf_dir), hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()  # 30 kB shards: several files

    # What a user does next: transformers loads model and tokenizer from the converted directory.
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert model.config.tie_word_embeddings == tie
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer.decode(tokenizer.encode("1+2=3")) == "1+2=3"


def test_megatron_checkpoint_chunks_follow_tp(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen2")
    convert.hf_to_megatron(hf_dir, tmp_path / "m", tp=2, pp=2)
    chunks = {k: md.chunks for k, md in CheckpointReader(tmp_path / "m").metadata.state_dict_metadata.items()}
    fc1 = sorted(
        tuple(c.offsets) for c in chunks["decoder.layers.mlp.linear_fc1.weight"] if c.offsets[0] == 1
    )
    assert fc1 == [(1, 0, 0), (1, 24, 0), (1, 48, 0), (1, 72, 0)]  # gate_0, gate_1, up_0, up_1 of layer 1
    proj = sorted(tuple(c.offsets) for c in chunks["decoder.layers.self_attention.linear_proj.weight"])
    assert proj[:2] == [(0, 0, 0), (0, 0, 16)]  # row parallel: split on the input dim
    assert [tuple(c.sizes) for c in chunks["embedding.word_embeddings.weight"]] == [(64, 32), (64, 32)]
    assert len(chunks["decoder.final_layernorm.weight"]) == 1


def test_reshard_preserves_every_tensor(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen3")
    convert.hf_to_megatron(hf_dir, tmp_path / "tp2pp2", tp=2, pp=2)
    convert.reshard(tmp_path / "tp2pp2", tmp_path / "tp1pp1", tp=1, pp=1)
    convert.reshard(tmp_path / "tp1pp1", tmp_path / "tp2pp1", tp=2, pp=1)
    first = megatron_tensors(tmp_path / "tp2pp2")
    for name in ("tp1pp1", "tp2pp1"):
        other = megatron_tensors(tmp_path / name)
        assert other.keys() == first.keys()
        for key, tensor in first.items():
            assert torch.equal(other[key], tensor), (name, key)
    assert read_meta(tmp_path / "tp2pp1").tensor_parallel == 2
    assert len(CheckpointReader(tmp_path / "tp1pp1").tensor_metadata("output_layer.weight").chunks) == 1


def test_dtypes(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "llama", dtype=torch.bfloat16)
    # Default: config.json's dtype (bfloat16), kept all the way.
    convert.hf_to_megatron(hf_dir, tmp_path / "m_bf16", tp=1, pp=1)
    assert read_meta(tmp_path / "m_bf16").dtype == "bfloat16"
    convert.megatron_to_hf(tmp_path / "m_bf16", tmp_path / "hf_bf16")
    original = hf_tensors(hf_dir)
    assert all(torch.equal(original[n], t) for n, t in hf_tensors(tmp_path / "hf_bf16").items())
    # Up to float32 in Megatron, then down to float16 in Hugging Face; config.json says so.
    convert.hf_to_megatron(hf_dir, tmp_path / "m_fp32", dtype=torch.float32)
    reader = CheckpointReader(tmp_path / "m_fp32")
    assert reader.tensor_metadata("decoder.layers.mlp.linear_fc2.weight").properties.dtype == torch.float32
    convert.megatron_to_hf(tmp_path / "m_fp32", tmp_path / "hf_fp16", dtype=torch.float16)
    back = hf_tensors(tmp_path / "hf_fp16")
    assert all(torch.equal(original[n].to(torch.float16), t) for n, t in back.items())
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf_fp16").dtype == torch.float16


def test_command_lines(tmp_path, capsys, user_error):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen2", tie=True)
    convert_cli.hf_to_megatron_main(
        [str(hf_dir), str(tmp_path / "m"), "--tp", "2", "--pp", "2", "--dtype", "bfloat16"]
    )
    assert "wrote 30 tensors" in capsys.readouterr().out  # embedding, 4 x 7 per layer, final norm
    convert_cli.reshard_main([str(tmp_path / "m"), str(tmp_path / "r"), "--tp", "1"])
    convert_cli.megatron_to_hf_main([str(tmp_path / "r"), str(tmp_path / "back"), "--max-shard-size", "1MB"])
    assert "to " in capsys.readouterr().out
    assert (tmp_path / "back" / "model.safetensors").is_file()  # one shard: no index
    assert read_meta(tmp_path / "r").dtype == "bfloat16"

    # A non-empty output directory is refused, then replaced with --overwrite.
    argv = [str(tmp_path / "r"), str(tmp_path / "back")]
    assert "not empty: pass --overwrite" in user_error(convert_cli.megatron_to_hf_main, argv)
    (tmp_path / "back" / "stale.safetensors").write_text("old")
    convert_cli.megatron_to_hf_main([str(tmp_path / "r"), str(tmp_path / "back"), "--overwrite"])
    assert not (tmp_path / "back" / "stale.safetensors").exists()
    assert not list(tmp_path.glob(".*.partial"))


def test_parse_size():
    assert convert_cli.parse_size("5GB") == 5 * 10**9
    assert convert_cli.parse_size("2GiB") == 2 * 2**30
    assert convert_cli.parse_size("1.5 mb") == 1_500_000
    with pytest.raises(argparse.ArgumentTypeError, match="cannot read size"):
        convert_cli.parse_size("five")


def _edit_config(hf_dir: Path, **changes) -> None:
    """Change config.json; per-layer lists (layer_types) are dropped so that transformers rebuilds them."""
    config = json.loads((hf_dir / "config.json").read_text())
    config.pop("layer_types", None)
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def test_clear_errors(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "qwen2", shard_size="40KB")
    out = tmp_path / "out"

    def fails(match: str, source: Path = hf_dir, **kwargs) -> None:
        with pytest.raises((ValueError, KeyError, FileNotFoundError, FileExistsError), match=match):
            convert.hf_to_megatron(source, out, **kwargs)
        assert not out.exists() and not list(tmp_path.glob(".*.partial"))  # nothing half-written is left

    fails("tensor parallel size 4 does not divide num_key_value_heads=2", tp=4)
    fails("pipeline parallel size 3 does not divide num_hidden_layers=4", pp=3)

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    _edit_config(bad, intermediate_size=64)
    fails(r"config/weights mismatch: model.layers.0.mlp.gate_proj.weight has shape \(48, 32\)", bad)
    _edit_config(bad, intermediate_size=48, num_hidden_layers=5)
    fails("config/weights mismatch: tensor model.layers.4.input_layernorm.weight is missing", bad)
    _edit_config(bad, num_hidden_layers=3)
    fails("model.layers.3.* has no Megatron counterpart", bad)
    _edit_config(bad, num_hidden_layers=4, model_type="mistral", architectures=["MistralForCausalLM"])
    fails("unknown architecture: config.json has model_type='mistral'", bad)
    _edit_config(bad, model_type="qwen2", num_attention_heads="four")
    fails("config.json is invalid", bad)
    _edit_config(bad, num_attention_heads=4)
    next(bad.glob("model-00002-*.safetensors")).unlink()
    fails("missing shard.*model-00002-of-", bad)
    fails("config.json not found", tmp_path)
    for inside in (hf_dir, tmp_path):  # --overwrite must never delete the input
        with pytest.raises(ValueError, match="would overwrite the input"):
            convert.hf_to_megatron(hf_dir, inside, overwrite=True)
    with pytest.raises(FileNotFoundError, match="not written by megatron-dapo"):
        convert.megatron_to_hf(hf_dir, out)


def test_megatron_checkpoint_shape_mismatch_is_reported(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "llama")
    convert.hf_to_megatron(hf_dir, tmp_path / "m")
    _edit_config(tmp_path / "m" / "hf", num_key_value_heads=4)
    with pytest.raises(ValueError, match=r"linear_qkv.weight has shape \(4, 64, 32\).*implies \(4, 96, 32\)"):
        convert.megatron_to_hf(tmp_path / "m", tmp_path / "back")


# ---- inputs the converters must refuse, each named in one line (issue 16, item 8) -----------------------

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """A sharded Hugging Face model and its Megatron conversion, copied by each test that damages them."""
    root = tmp_path_factory.mktemp("sources")
    hf_dir = save_tiny_hf_model(root / "hf", "qwen2", shard_size="40KB")
    convert.hf_to_megatron(hf_dir, root / "megatron")
    return hf_dir, root / "megatron"


def _file_of(hf_dir: Path, tensor: str) -> Path:
    return hf_dir / json.loads((hf_dir / INDEX).read_text())["weight_map"][tensor]


def _set_index_entry(hf_dir: Path, tensor: str, file_name: str) -> None:
    index = json.loads((hf_dir / INDEX).read_text())
    index["weight_map"][tensor] = file_name
    (hf_dir / INDEX).write_text(json.dumps(index))


def _escape_the_folder(hf: Path, tmp: Path, rng: random.Random) -> str:
    """An index entry naming a real shard outside the model folder: read, it would convert silently."""
    tensor = rng.choice(sorted(json.loads((hf / INDEX).read_text())["weight_map"]))
    outside = tmp / "elsewhere" / _file_of(hf, tensor).name
    outside.parent.mkdir()
    shutil.copy(_file_of(hf, tensor), outside)
    _set_index_entry(hf, tensor, rng.choice([f"../elsewhere/{outside.name}", str(outside)]))
    return f"{hf / INDEX}: weight file "


def _truncate_a_shard(hf: Path, tmp: Path, rng: random.Random) -> str:
    shard = rng.choice(sorted(hf.glob("model-*.safetensors")))
    data = shard.read_bytes()
    shard.write_bytes(data[: rng.randint(1, len(data) - 1)])
    return f"{shard}: not a readable safetensors file"


def _drop_the_weight_map(hf: Path, tmp: Path, rng: random.Random) -> str:
    (hf / INDEX).write_text(json.dumps({"metadata": {"total_size": rng.randint(1, 10**6)}}))
    return f"{hf / INDEX}: expected a weight_map object"


def _garble(name: str) -> Callable[[Path, Path, random.Random], str]:
    def garble(hf: Path, tmp: Path, rng: random.Random) -> str:
        text = (hf / name).read_text()
        (hf / name).write_text(text[: rng.randint(1, len(text) - 2)])  # cut mid-document: not JSON
        return f"{hf / name}: not valid JSON"

    return garble


def _untie_the_head(hf: Path, tmp: Path, rng: random.Random) -> str:
    """tie_word_embeddings=true over a model whose lm_head differs: converting would drop the head."""
    _edit_config(hf, tie_word_embeddings=True)
    return f"{_file_of(hf, 'lm_head.weight')}: config.json sets tie_word_embeddings=true but lm_head.weight"


HF_DAMAGE = {
    "index entry outside the folder": _escape_the_folder,
    "truncated safetensors": _truncate_a_shard,
    "index without weight_map": _drop_the_weight_map,
    "config.json not JSON": _garble("config.json"),
    "index not JSON": _garble(INDEX),
    "tied embeddings, different head": _untie_the_head,
}


@pytest.mark.parametrize("damage", sorted(HF_DAMAGE))
def test_a_damaged_hf_folder_is_named(damage, sources, tmp_path, user_error):
    hf = tmp_path / "hf"
    shutil.copytree(sources[0], hf)
    expected = HF_DAMAGE[damage](hf, tmp_path, random.Random())
    err = user_error(convert_cli.hf_to_megatron_main, [str(hf), str(tmp_path / "out")])
    assert err.startswith(f"dapo-convert-hf-to-megatron: error: {expected}"), err
    assert not (tmp_path / "out").exists()


def test_a_tied_head_equal_to_the_embedding_converts(sources, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(sources[0], hf)
    embedding = hf_tensors(hf)["model.embed_tokens.weight"]
    shard = _file_of(hf, "lm_head.weight")
    save_file({**load_file(shard), "lm_head.weight": embedding.clone()}, shard, metadata={"format": "pt"})
    _edit_config(hf, tie_word_embeddings=True)
    convert.hf_to_megatron(hf, tmp_path / "m")
    convert.megatron_to_hf(tmp_path / "m", tmp_path / "back")
    back = hf_tensors(tmp_path / "back")
    assert "lm_head.weight" not in back and torch.equal(back["model.embed_tokens.weight"], embedding)


@pytest.mark.parametrize("flag", ["--tp", "--pp"])
@pytest.mark.parametrize("command", ["dapo-convert-hf-to-megatron", "dapo-reshard"])
def test_parallel_sizes_below_one_are_refused(flag, command, sources, tmp_path, user_error):
    """--tp -2 wrote a broken checkpoint and exited 0; --tp 0 divided by zero."""
    main, source = {
        "dapo-convert-hf-to-megatron": (convert_cli.hf_to_megatron_main, sources[0]),
        "dapo-reshard": (convert_cli.reshard_main, sources[1]),
    }[command]
    rng = random.Random()
    for size in (0, -rng.randint(1, 8)):
        err = user_error(main, [str(source), str(tmp_path / "out"), flag, str(size)])
        assert err.startswith(f"{command}: error: parallel sizes must be at least 1"), err
        assert f"{'tensor' if flag == '--tp' else 'pipeline'} {size}" in err
        assert not (tmp_path / "out").exists()


def test_out_must_be_a_folder_outside_the_input(sources, tmp_path, user_error):
    hf, megatron = sources
    out_file = tmp_path / "out.bin"
    content = random.Random().randbytes(64)
    out_file.write_bytes(content)
    for argv in ([str(hf), str(out_file)], [str(hf), str(out_file), "--overwrite"]):
        err = user_error(convert_cli.hf_to_megatron_main, argv)
        assert err.startswith(f"dapo-convert-hf-to-megatron: error: output directory {out_file} is a file")
    assert out_file.read_bytes() == content
    inside = megatron / "converted"
    err = user_error(convert_cli.megatron_to_hf_main, [str(megatron), str(inside)])
    assert f"output directory {inside} is inside the input {megatron}" in err
    assert not inside.exists()


@pytest.mark.parametrize("damaged", [".metadata", "__0_0.distcp"])
def test_a_damaged_megatron_checkpoint_is_named(damaged, sources, tmp_path, user_error):
    megatron = tmp_path / "m"
    shutil.copytree(sources[1], megatron)
    data = (megatron / damaged).read_bytes()
    (megatron / damaged).write_bytes(data[: random.Random().randint(1, len(data) - 1)])
    err = user_error(convert_cli.reshard_main, [str(megatron), str(tmp_path / "out")])
    expected = f"{megatron / '.metadata'}: damaged" if damaged == ".metadata" else f"{megatron}: cannot read"
    assert err.startswith(f"dapo-reshard: error: {expected}"), err
    assert not (tmp_path / "out").exists()
