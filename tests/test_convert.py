"""tools/convert_checkpoint.py and tools/check_parity.py, run as a user runs them."""

import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_hf_model
from megatron_vl.checkpoint.layout import CheckpointError
from megatron_vl.checkpoint.release import hf_to_shards, load_shard_for, save_release_checkpoint, shards_to_hf
from megatron_vl.convert.hf import hf_config_from_model, load_hf_state_dict, model_config_from_hf, save_hf_directory
from megatron_vl.testing import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, expect=0, timeout=180):
    """Runs a command in its own process group; on timeout it and all it started (torchrun and
    its workers) are killed, so a hang fails the test instead of outliving it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = processes.run_script(args, cwd=ROOT, env=env, timeout=timeout, merge_stderr=True)
    out = proc.stdout
    assert proc.returncode == expect, f"{args} exited {proc.returncode}, expected {expect}\n{out}"
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (GQA, vocabulary 1003) with a sentencepiece tokenizer."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("hf")
    model = tiny_hf_model(seed=21)
    model.save_pretrained(d)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(f"a red circle above a blue square number {i}" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    os.remove(d / "tokenizer.vocab")
    os.remove(corpus)
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return d


def _tensors(path):
    return load_hf_state_dict(str(path))


def test_import_export_round_trip_is_bit_identical(hf_dir, tmp_path):
    from transformers import LlamaForCausalLM
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    log = _run(sys.executable, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", str(hf_dir), "--save", str(ckpt),
               "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert "vocabulary 1003 padded to 1024" in log
    assert (ckpt / "latest").read_text() == "release"
    assert sorted(os.listdir(ckpt / "release")) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    stage1 = load_file(str(ckpt / "release" / "mp_rank_01_001" / "model.safetensors"))
    assert "layers.1.attention.qkv.weight" in stage1 and "layers.0.attention.qkv.weight" not in stage1
    assert stage1["head.output.weight"].shape == (512, 64)   # 1024 padded rows / 2 ranks
    _run(sys.executable, "tools/convert_checkpoint.py", "export-hf", "--load", str(ckpt), "--save", str(out))
    original, exported = _tensors(hf_dir), _tensors(out)
    assert set(original) == set(exported)
    for name, t in original.items():
        assert exported[name].dtype == t.dtype and torch.equal(exported[name], t), name
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1003, (2, 20))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, LlamaForCausalLM.from_pretrained(hf_dir).eval()(ids).logits)


def test_resharding_on_load_equals_direct_conversion(hf_dir, tmp_path):
    sd = _tensors(hf_dir)
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    save_release_checkpoint(str(tmp_path / "tp2"), hf_to_shards(sd, cfg, 2, 1), cfg, 2, 1)
    direct = hf_to_shards(sd, cfg, 1, 2)
    for stage in range(2):
        got = load_shard_for(str(tmp_path / "tp2"), 1, 2, 0, stage)
        assert set(got) == set(direct[(0, stage)])
        assert all(torch.equal(got[k], direct[(0, stage)][k]) for k in got)


def test_bin_and_indexed_safetensors_inputs(hf_dir, tmp_path):
    sd = _tensors(hf_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(sd, bin_dir / "pytorch_model.bin")
    assert all(torch.equal(_tensors(bin_dir)[k], v) for k, v in sd.items())
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    sharded = tmp_path / "sharded"
    save_hf_directory(str(sharded), sd, hf_config_from_model(cfg, torch.float32), max_shard_bytes=100_000)
    files = os.listdir(sharded)
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]) > 1
    from transformers import LlamaForCausalLM
    loaded = LlamaForCausalLM.from_pretrained(sharded)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


def test_clear_errors_and_nothing_half_written(hf_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf_dir / "config.json").read_text())
    out = _run(sys.executable, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", str(empty), "--save",
               str(tmp_path / "c"), expect=1)
    assert "no *.safetensors or pytorch_model*.bin weight files" in out
    assert not (tmp_path / "c").exists()
    out = _run(sys.executable, "tools/convert_checkpoint.py", "export-hf", "--load", str(empty), "--save",
               str(tmp_path / "e"), expect=1)
    assert "not a megatron-vl checkpoint" in out
    # A shard that disappears mid-way: the export fails and leaves no directory behind.
    sd = _tensors(hf_dir)
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    shards = hf_to_shards(sd, cfg, 2, 1)
    del shards[(1, 0)]["layers.1.mlp.down.weight"]
    with pytest.raises(CheckpointError, match="lacks tensor layers.1.mlp.down.weight"):
        shards_to_hf(shards, cfg, 2, 1)
    cfg_bad = json.loads((hf_dir / "config.json").read_text())
    cfg_bad["attention_bias"] = True
    with pytest.raises(CheckpointError, match="attention_bias=true is not supported"):
        model_config_from_hf(cfg_bad)


def test_check_parity_under_torchrun(hf_dir, tmp_path):
    from megatron_vl.testing.distributed import free_port
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    out = _run(*torchrun, "tools/check_parity.py", "--hf-dir", str(hf_dir), "--tensor-model-parallel-size", "2")
    m = re.search(r"max abs logit difference \(TP=2\): (\S+) \[OK", out)
    assert m and float(m.group(1)) <= 1e-5, out
    # A damaged conversion is caught: one k_proj head perturbed in the TP=2 checkpoint.
    ckpt = tmp_path / "ckpt"
    _run(sys.executable, "tools/convert_checkpoint.py", "import-hf", "--hf-dir", str(hf_dir), "--save", str(ckpt),
         "--tensor-model-parallel-size", "2")
    shard_file = ckpt / "release" / "mp_rank_01_000" / "model.safetensors"
    shard = load_file(str(shard_file))
    shard["layers.0.attention.qkv.weight"][40] += 0.05
    save_file(shard, str(shard_file))
    out = _run(*torchrun, "tools/check_parity.py", "--hf-dir", str(hf_dir), "--load", str(ckpt),
               "--tensor-model-parallel-size", "2", expect=1)
    assert "FAIL" in out
