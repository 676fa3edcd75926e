"""A release checkpoint loaded at another TP/PP layout: each rank reads, tensor by tensor, only
the stored slices that hold part of its own weights (training/build.py release_weights ->
checkpoint/release.py shard_for -> checkpoint/slicing.py), and gets exactly what the old
whole-checkpoint path (every shard read, joined into an HF state dict, cut again) gave."""

import itertools
import json
import sys

import torch

from megatron_vl.checkpoint.release import hf_to_shards, load_release_shards, save_release_checkpoint, shards_to_hf
from megatron_vl.config import Config, ModelConfig
from megatron_vl.parallel.state import ParallelState
from megatron_vl.testing import processes
from megatron_vl.training.build import release_weights

MB = 2**20


def _hf_state_dict(m: ModelConfig, dtype=torch.float32, seed=0):
    """A random LlamaForCausalLM state dict of model m. Tensor k is the k-th window of one
    random sequence (shifted by one element each: no two tensors alike), so that 100 MiB of
    weights take one draw of the largest tensor's size."""
    q, kv, h, f = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden_size, m.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h), "lm_head.weight": (m.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(m.num_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in (
            ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)),
            ("self_attn.q_proj.weight", (q, h)), ("self_attn.k_proj.weight", (kv, h)),
            ("self_attn.v_proj.weight", (kv, h)), ("self_attn.o_proj.weight", (h, q)),
            ("mlp.gate_proj.weight", (f, h)), ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f)))})
    sizes = {name: torch.Size(shape).numel() for name, shape in shapes.items()}
    pool = torch.randn(max(sizes.values()) + len(shapes), generator=torch.Generator().manual_seed(seed)).to(dtype)
    return {name: pool[k:k + sizes[name]].view(shape).clone() for k, (name, shape) in enumerate(shapes.items())}


def _eager_shard(path, run: Config, tp, pp, tp_rank, pp_rank):
    """What release_weights gave before it read lazily: the whole checkpoint as an HF state
    dict, vocabulary tables grown at the mean, cut for the rank."""
    shards, ck, ck_tp, ck_pp = load_release_shards(path)
    hf = shards_to_hf(shards, ck, ck_tp, ck_pp)
    del shards
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        t = hf[key]
        grown = run.model.vocab_size - t.shape[0]
        hf[key] = torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(grown, -1)])
    return hf_to_shards(hf, run.model, tp, pp)[(tp_rank, pp_rank)]


def _state(tp, pp, tp_rank, pp_rank) -> ParallelState:
    return next(s for s in (ParallelState(tp=tp, pp=pp, rank=r) for r in range(tp * pp))
                if (s.tp_rank, s.pp_rank) == (tp_rank, pp_rank))


def test_any_layout_gives_the_whole_checkpoint_paths_weights_exactly(tmp_path):
    """Checkpoints at TP 4 and at PP 2 (vocabulary padded to multiples of 8 x TP, so the padding
    changes with TP), loaded at other layouts by every rank, a run with 3 more tokens (the
    tables grow): each tensor equals the old path's, bit for bit, and each rank gets its
    stage's names exactly."""
    ck = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=48, num_attention_heads=8, num_query_groups=4,
                     vocab_size=1003, make_vocab_size_divisible_by=8, untie_embeddings_and_output_weights=True)
    hf = _hf_state_dict(ck)
    runs = {grow: Config(model=ModelConfig(**{**vars(ck), "vocab_size": ck.vocab_size + grow})) for grow in (0, 3)}
    checked = 0
    for (ck_tp, ck_pp), layouts in {(4, 1): [(2, 2), (1, 4), (4, 1)], (1, 2): [(4, 1), (2, 4)]}.items():
        path = str(tmp_path / f"tp{ck_tp}pp{ck_pp}")
        save_release_checkpoint(path, hf_to_shards(hf, ck, ck_tp, ck_pp), ck, ck_tp, ck_pp)
        for (tp, pp), run in itertools.product(layouts, runs.values()):
            for tp_rank, pp_rank in itertools.product(range(tp), range(pp)):
                want = _eager_shard(path, run, tp, pp, tp_rank, pp_rank)
                got = release_weights(path, run, _state(tp, pp, tp_rank, pp_rank))
                assert sorted(got) == sorted(want), (ck_tp, ck_pp, tp, pp, tp_rank, pp_rank)
                for name, tensor in want.items():
                    mine = got[name]
                    assert mine.dtype == tensor.dtype and torch.equal(mine, tensor), (tp, pp, tp_rank, pp_rank, name)
                checked += 1
    assert checked == 2 * (4 + 4 + 4 + 4 + 8)


CHILD = """
import json, sys
import torch
from megatron_vl.checkpoint.release import hf_to_shards, load_release_shards, read_checkpoint_meta, shard_for
from megatron_vl.checkpoint.release import shards_to_hf
from megatron_vl.config import Config

path, (tp, pp, tp_rank, pp_rank) = sys.argv[1], map(int, sys.argv[2:6])
run = Config(model=read_checkpoint_meta(path)[0])
def status(key):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))
# VmHWM: this address space's peak RSS since exec. Not ru_maxrss: execve keeps in it the peak
# of the process that forked (the pytest process, which wrote the checkpoint).
peak = lambda: status("VmHWM")
before = status("VmRSS")
earlier = peak() - before   # how far the imports' peak lies above the baseline (overstates growth)
weights = shard_for(path, run, tp, pp, tp_rank, pp_rank)   # what release_weights returns
held = {name: weights[name] for name in weights}   # what the rank's module holds after the load
lazy = peak() - before
shards, ck, ck_tp, ck_pp = load_release_shards(path)
eager = hf_to_shards(shards_to_hf(shards, ck, ck_tp, ck_pp), run.model, tp, pp)[(tp_rank, pp_rank)]
print(json.dumps({"lazy_growth": lazy, "eager_growth": peak() - before, "earlier_peak": earlier,
                  "held_bytes": sum(t.numel() * t.element_size() for t in held.values()),
                  "names_equal": sorted(held) == sorted(eager),
                  "equal": all(held[k].dtype == v.dtype and torch.equal(held[k], v) for k, v in eager.items())}))
"""


def test_a_rank_of_another_layout_holds_its_slice_not_the_checkpoint(tmp_path):
    """A 16-layer LLaMA (106 MiB of bf16 weights) saved at TP 4, loaded in a fresh process as
    TP rank 1, stage 1 of a TP 2 x PP 4 run (4 of the 16 layers, half of each tensor: 11.3 MiB).
    The peak RSS growth of the load stays under the rank's slice + the largest full tensor
    (every stored slice of one tensor may be read at once) + 16 MiB (allocator and Python
    overhead), a third of the checkpoint; the old path, run after it in the same process,
    grows by more than the whole checkpoint. Both give the same tensors."""
    ck = ModelConfig(num_layers=16, hidden_size=512, ffn_hidden_size=1408, num_attention_heads=8,
                     num_query_groups=4, vocab_size=8000, untie_embeddings_and_output_weights=True)
    hf = _hf_state_dict(ck, torch.bfloat16)
    whole = sum(t.numel() * t.element_size() for t in hf.values())
    largest = 2 * ck.ffn_hidden_size * ck.hidden_size * 2   # the fused gate/up projection of a layer, bf16
    path = tmp_path / "release"
    save_release_checkpoint(str(path), hf_to_shards(hf, ck, 4, 1), ck, 4, 1)
    del hf
    out = processes.run_script([sys.executable, "-c", CHILD, path, 2, 4, 1, 1], timeout=120, expect=0)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["names_equal"] and got["equal"]
    slice_bytes = got["held_bytes"]
    bound = slice_bytes + largest + 16 * MB
    print(f"whole {whole / MB:.1f} MiB, slice {slice_bytes / MB:.1f} MiB, largest tensor {largest / MB:.1f} MiB, "
          f"bound {bound / MB:.1f} MiB; peak RSS growth: lazy {got['lazy_growth'] / MB:.1f} MiB, "
          f"eager {got['eager_growth'] / MB:.1f} MiB (peak before the load over its RSS: "
          f"{got['earlier_peak'] / MB:.1f} MiB)")
    assert bound < whole / 3
    assert got["lazy_growth"] < bound
    assert got["eager_growth"] > whole
