"""Hugging Face LLaMA <-> our sharded language-model checkpoints.

Our converted ("release") checkpoint, Megatron's layout with safetensors shards::

    C/latest                                   "release"
    C/release/mp_rank_{tp:02d}_{pp:03d}/model.safetensors   one (TP rank, PP stage) shard
    C/megatron_vl_checkpoint.json              model config, tp, pp, format version
    C/tokenizer/                               tokenizer files copied from the HF directory

Shard tensors are stored with *global* layer indices so any stage's file names the layers
it holds. Conversion only splits and concatenates tensors, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..atomic import remove_stale_temps, temp_name
from ..config import ModelConfig
from ..errors import UserError
from ..parallel.layers import shard_parts, unshard_parts

FORMAT_VERSION = 1
META_FILE = "megatron_vl_checkpoint.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
Shards = Dict[Tuple[int, int], Dict[str, torch.Tensor]]  # (tp_rank, pp_rank) -> tensors


class CheckpointError(UserError, RuntimeError):
    pass


# --- configs ---------------------------------------------------------------------------

def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our ModelConfig from a LlamaForCausalLM config.json (transformers 4.x or 5.x keys)."""
    name = hf.get("_name_or_path", "config.json")
    if hf.get("model_type") not in ("llama", None):
        raise CheckpointError(f"{name}: model_type {hf.get('model_type')!r} is not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{name}: {key}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{name}: hidden_act {hf['hidden_act']!r} is not silu")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise CheckpointError(f"{name}: head_dim {hf['head_dim']} != hidden_size / heads")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {**legacy, **rope}
    cfg = ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        max_position_embeddings=hf.get("max_position_embeddings"), vocab_size=hf["vocab_size"],
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02))
    cfg.seq_length = min(cfg.seq_length, cfg.max_positions)
    if rope_type == "llama3":
        cfg.rope_scaling_type = "llama3"
        cfg.rope_scaling_factor = float(scaling["factor"])
        cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
        cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
        cfg.rope_original_max_position_embeddings = int(scaling["original_max_position_embeddings"])
    elif rope_type != "default":
        raise CheckpointError(f"{name}: rope type {rope_type!r} is not supported (default, llama3)")
    return cfg


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, extra: Optional[dict] = None) -> dict:
    """config.json for LlamaForCausalLM with the same architecture."""
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling_type == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
    out = dict(extra or {})
    out.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": cfg.rotary_base, "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling_type is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "initializer_range": cfg.init_method_std,
        "dtype": str(dtype).replace("torch.", ""),
    })
    return out


# --- tensors: HF full state dict <-> (tp, pp) shards -------------------------------------

def layer_map(cfg: ModelConfig):
    """our per-layer name -> (HF names, fused part sizes, split dim); None dim = replicated."""
    q, kv, f = cfg.num_attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    return {
        "input_norm.weight": (["input_layernorm.weight"], None, None),
        "attention.qkv.weight": (["self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                  "self_attn.v_proj.weight"], [q, kv, kv], 0),
        "attention.out.weight": (["self_attn.o_proj.weight"], [q], 1),
        "post_attention_norm.weight": (["post_attention_layernorm.weight"], None, None),
        "mlp.gate_up.weight": (["mlp.gate_proj.weight", "mlp.up_proj.weight"], [f, f], 0),
        "mlp.down.weight": (["mlp.down_proj.weight"], [f], 1),
    }


def _stage_layers(cfg: ModelConfig, pp: int, stage: int) -> range:
    per = cfg.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if rows > t.shape[0] else t


def check_layout(cfg: ModelConfig, tp: int, pp: int, name: str = "the model") -> None:
    """Refuses a TP x PP layout the model cannot be cut into, naming every size that does not
    divide (before any tensor is read or written)."""
    problems = []
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tensor-model-parallel-size {tp} / --pipeline-model-parallel-size {pp}: "
                              "must be at least 1")
    for what, size in (("attention heads", cfg.num_attention_heads), ("key/value heads", cfg.kv_heads),
                       ("FFN width (intermediate_size)", cfg.ffn_hidden_size)):
        if size % tp:
            problems.append(f"{what} {size}")
    if cfg.padded_vocab_size(tp) % tp:   # padding makes it divisible; kept as a guard
        problems.append(f"padded vocabulary {cfg.padded_vocab_size(tp)}")
    if problems:
        raise CheckpointError(f"{name} cannot be split over --tensor-model-parallel-size {tp}: "
                              f"{', '.join(problems)} not divisible by {tp}")
    if cfg.num_layers % pp:
        raise CheckpointError(f"{name}: {cfg.num_layers} layers cannot be split into {pp} pipeline stages "
                              "(--pipeline-model-parallel-size)")


def hf_to_shards(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig, tp: int, pp: int) -> Shards:
    check_layout(cfg, tp, pp)
    padded = cfg.padded_vocab_size(tp)
    tied = not cfg.untie_embeddings_and_output_weights
    missing = [k for k in ["model.embed_tokens.weight", "model.norm.weight"] + ([] if tied else ["lm_head.weight"])
               if k not in hf_sd]
    if missing:
        raise CheckpointError(f"HF state dict lacks {missing}")
    shards: Shards = {}
    for stage in range(pp):
        for rank in range(tp):
            sd: Dict[str, torch.Tensor] = {}
            if stage == 0:
                emb = _pad_rows(hf_sd["model.embed_tokens.weight"], padded)
                sd["embedding.word_embeddings.weight"] = shard_parts(emb, [padded], rank, tp)
            for i in _stage_layers(cfg, pp, stage):
                for ours, (theirs, parts, dim) in layer_map(cfg).items():
                    src = [hf_sd[f"model.layers.{i}.{n}"] for n in theirs]
                    full = torch.cat(src, dim=dim or 0) if len(src) > 1 else src[0]
                    sd[f"layers.{i}.{ours}"] = full.clone() if dim is None else shard_parts(full, parts, rank, tp, dim)
            if stage == pp - 1:
                sd["head.final_norm.weight"] = hf_sd["model.norm.weight"].clone()
                if not tied:
                    sd["head.output.weight"] = shard_parts(_pad_rows(hf_sd["lm_head.weight"], padded), [padded], rank, tp)
            shards[(rank, stage)] = sd
    return shards


def shards_to_hf(shards: Shards, cfg: ModelConfig, tp: int, pp: int) -> Dict[str, torch.Tensor]:
    """Full HF state dict; padded vocabulary rows are stripped."""
    padded = cfg.padded_vocab_size(tp)

    def gather(name, stage, parts, dim):
        try:
            return unshard_parts([shards[(r, stage)][name] for r in range(tp)], parts, dim)
        except KeyError:
            raise CheckpointError(f"shard (pp stage {stage}) lacks tensor {name}") from None

    hf: Dict[str, torch.Tensor] = {}
    hf["model.embed_tokens.weight"] = gather("embedding.word_embeddings.weight", 0, [padded], 0)[:cfg.vocab_size]
    for stage in range(pp):
        for i in _stage_layers(cfg, pp, stage):
            for ours, (theirs, parts, dim) in layer_map(cfg).items():
                name = f"layers.{i}.{ours}"
                if dim is None:
                    hf[f"model.layers.{i}.{theirs[0]}"] = shards[(0, stage)][name]
                    continue
                full = gather(name, stage, parts, dim)
                for hf_name, piece in zip(theirs, full.split(parts, dim=dim) if len(theirs) > 1 else [full]):
                    hf[f"model.layers.{i}.{hf_name}"] = piece.contiguous()
    hf["model.norm.weight"] = shards[(0, pp - 1)]["head.final_norm.weight"]
    if cfg.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = gather("head.output.weight", pp - 1, [padded], 0)[:cfg.vocab_size].contiguous()
    hf["model.embed_tokens.weight"] = hf["model.embed_tokens.weight"].contiguous()
    return hf


def local_to_global(sd: Dict[str, torch.Tensor], layer_offset: int) -> Dict[str, torch.Tensor]:
    """A LlamaModel state dict (stage-local layer indices) -> shard names (global indices)."""
    def rename(k):
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        return f"layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else k
    return {rename(k): v for k, v in sd.items()}


def global_to_local(sd: Dict[str, torch.Tensor], layer_offset: int) -> Dict[str, torch.Tensor]:
    return local_to_global(sd, -layer_offset)


# --- files ------------------------------------------------------------------------------

def load_hf_state_dict(hf_dir: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a transformers checkpoint directory: safetensors (single file or
    indexed shards) or pytorch_model*.bin."""
    files = sorted(os.listdir(hf_dir))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if re.fullmatch(r"pytorch_model.*\.bin", f)]
    if not st and not bins:
        raise CheckpointError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weight files")
    sd: Dict[str, torch.Tensor] = {}
    for f in st or bins:
        path = os.path.join(hf_dir, f)
        try:
            part = load_file(path) if st else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read weights: {exc}") from None
        sd.update(part)
    return sd


def _old_name(final: str) -> str:
    """Where the previous output waits while the new one is renamed into place."""
    return temp_name(os.path.abspath(final) + ".old")


def _recover_leftovers(final: str, log=print) -> None:
    """What a writer killed while replacing `final` left in its parent: a previous output
    moved aside just before the swap is put back when `final` is gone (nothing else holds it);
    then every leftover of a dead writer (the half-written new output, an old one the swap had
    already replaced) is removed, saying so."""
    import re
    import socket
    from ..atomic import _pid_alive
    final = os.path.abspath(final)
    parent, base = os.path.dirname(final), os.path.basename(final)
    old_pattern = re.compile(re.escape(base) + r"\.old\.tmp(\d+)-(.+)$")
    for name in sorted(os.listdir(parent)):
        m = old_pattern.match(name)
        if not m or m.group(2) != socket.gethostname() or _pid_alive(int(m.group(1))):
            continue
        if not os.path.lexists(final):
            os.replace(os.path.join(parent, name), final)
            log(f"note: restored {final} from {name}, where a run (pid {m.group(1)}, no longer running) had moved "
                "it just before replacing it")
    for prefix in (base + ".tmp", base + ".old.tmp"):
        remove_stale_temps(parent, prefix=prefix, log=log)


def _atomic_dir(final: str, log=print):
    """A temporary sibling directory (temp_name: the writer's pid and host) that replaces
    `final` only when complete."""
    parent = os.path.dirname(os.path.abspath(final)) or "."
    os.makedirs(parent, exist_ok=True)
    _recover_leftovers(final, log)
    tmp = temp_name(os.path.abspath(final))
    os.makedirs(tmp)
    return tmp


def _commit_dir(tmp: str, final: str) -> None:
    if os.path.exists(final):
        if os.listdir(final):
            old = _old_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
            return
        os.rmdir(final)
    os.replace(tmp, final)


# What each kind of output directory holds, to recognise a previous output of the same kind:
# (marker file, JSON key, expected value).
OUTPUT_KINDS = {
    "release": (META_FILE, "format", "megatron-vl-release"),
    "hf-llama": ("config.json", "model_type", "llama"),
    "vlgpt-export": ("vlgpt_config.json", "format", "megatron-vl-vlgpt"),
    "stage1-export": ("stage1_export.json", "format", "megatron-vl-stage1"),
}


def output_kind(path: str) -> Optional[str]:
    """Which of OUTPUT_KINDS a directory is a previous output of, or None. A VL-GPT export
    also holds an HF LLaMA config.json, so it is checked first."""
    for kind in ("vlgpt-export", "release", "hf-llama", "stage1-export"):
        marker, key, value = OUTPUT_KINDS[kind]
        try:
            with open(os.path.join(path, marker)) as fh:
                if json.load(fh).get(key) == value:
                    return kind
        except (OSError, ValueError, AttributeError):
            continue
    return None


def check_output_dir(final: str, kind: str, sources: Tuple[str, ...] = ()) -> None:
    """Refuses an output directory whose replacement would destroy anything but a previous
    output of the same kind: a non-empty directory of another kind (a project folder, a
    checkpoint), a file, or a directory holding one of the inputs."""
    target = os.path.realpath(final)
    for src in filter(None, sources):
        src_real = os.path.realpath(src)
        if src_real == target or src_real.startswith(target + os.sep):
            raise CheckpointError(f"--save {final}: it holds the input {src}; replacing it would delete the "
                                  "input. Choose a new directory")
    if not os.path.lexists(final):
        return
    if not os.path.isdir(final):
        raise CheckpointError(f"--save {final}: exists and is not a directory")
    if not os.listdir(final):
        return
    found = output_kind(final)
    if found != kind:
        what = f"a {found} directory" if found else "a non-empty directory that is not a previous output"
        raise CheckpointError(f"--save {final}: {what}; only a previous {kind} output is replaced. Nothing was "
                              "written or deleted: choose a new or empty directory, or remove it yourself")


class atomic_directory:
    """``with atomic_directory(final, kind) as tmp:`` write into tmp; it replaces final only
    when the block completes, and is removed if it raises. A non-empty `final` is replaced
    only when it is a previous output of the same `kind` (check_output_dir); the check runs
    again just before the swap, so a directory that appeared meanwhile is not lost either."""

    def __init__(self, final: str, kind: str, sources: Tuple[str, ...] = ()):
        self.final, self.kind, self.sources = final, kind, tuple(s for s in sources if s)
        check_output_dir(self.final, self.kind, self.sources)

    def __enter__(self) -> str:
        self.tmp = _atomic_dir(self.final)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                check_output_dir(self.final, self.kind, self.sources)
                _commit_dir(self.tmp, self.final)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def copy_tokenizer_files(src: str, dst: str) -> int:
    n = 0
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            n += 1
    return n


def shard_dir(ckpt: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt, "release", f"mp_rank_{tp_rank:02d}_{pp_rank:03d}")


def save_release_checkpoint(ckpt: str, shards: Shards, cfg: ModelConfig, tp: int, pp: int,
                            tokenizer_dir: Optional[str] = None, sources: Tuple[str, ...] = ()) -> None:
    with atomic_directory(ckpt, "release", sources) as tmp:
        for (rank, stage), sd in shards.items():
            d = shard_dir(tmp, rank, stage)
            os.makedirs(d)
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                      metadata={"format": "pt"})
        if tokenizer_dir:
            copy_tokenizer_files(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        meta = {"format": "megatron-vl-release", "version": FORMAT_VERSION, "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp, "model": dataclasses.asdict(cfg)}
        with open(os.path.join(tmp, META_FILE), "w") as fh:
            json.dump(meta, fh, indent=2)
        with open(os.path.join(tmp, "latest"), "w") as fh:
            fh.write("release")


def _not_release(ckpt: str) -> str:
    """What a directory without the release metadata is, for the message that refuses it."""
    if not os.path.isdir(ckpt):
        return "no such directory"
    try:
        with open(os.path.join(ckpt, "latest")) as fh:
            tag = fh.read().strip()
    except (OSError, UnicodeDecodeError):
        tag = ""
    if tag.startswith("iter_"):
        tag_dir = os.path.join(ckpt, tag)
        if os.path.isdir(os.path.join(tag_dir, "image_tokenizer")):
            return (f"a stage-1 (image tokenizer) training checkpoint ({tag}), not a converted language model; "
                    "tools/export_tokenizer.py exports it")
        return (f"a training checkpoint ({tag}), not a converted release checkpoint (import-hf output, "
                f"{META_FILE}); export it with tools/convert_checkpoint.py export-hf first")
    return f"not a megatron-vl checkpoint ({META_FILE} missing)"


def read_checkpoint_meta(ckpt: str) -> Tuple[ModelConfig, int, int]:
    path = os.path.join(ckpt, META_FILE)
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: {_not_release(ckpt)}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')} (this code reads {FORMAT_VERSION})")
    return ModelConfig(**meta["model"]), meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]


def load_release_shards(ckpt: str) -> Tuple[Shards, ModelConfig, int, int]:
    cfg, tp, pp = read_checkpoint_meta(ckpt)
    shards: Shards = {}
    for stage in range(pp):
        for rank in range(tp):
            path = os.path.join(shard_dir(ckpt, rank, stage), "model.safetensors")
            if not os.path.isfile(path):
                raise CheckpointError(f"{ckpt}: shard for tp rank {rank}, pp stage {stage} missing ({path})")
            shards[(rank, stage)] = load_file(path)
    return shards, cfg, tp, pp


def load_shard_for(ckpt: str, tp: int, pp: int, tp_rank: int, pp_rank: int) -> Dict[str, torch.Tensor]:
    """The shard a (tp_rank, pp_rank) of a tp x pp run needs; re-shards when the checkpoint
    was written with another layout."""
    cfg, ck_tp, ck_pp = read_checkpoint_meta(ckpt)
    if (ck_tp, ck_pp) == (tp, pp):
        return load_file(os.path.join(shard_dir(ckpt, tp_rank, pp_rank), "model.safetensors"))
    shards, cfg, ck_tp, ck_pp = load_release_shards(ckpt)
    return hf_to_shards(shards_to_hf(shards, cfg, ck_tp, ck_pp), cfg, tp, pp)[(tp_rank, pp_rank)]


def save_hf_directory(out_dir: str, hf_sd: Dict[str, torch.Tensor], hf_config: dict,
                      tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30,
                      sources: Tuple[str, ...] = ()) -> None:
    """A directory LlamaForCausalLM.from_pretrained loads: config.json, safetensors (indexed
    shards above max_shard_bytes), tokenizer files. Written to a temporary directory first."""
    with atomic_directory(out_dir, "hf-llama", sources) as tmp:
        write_hf_files(tmp, hf_sd, hf_config, tokenizer_dir, max_shard_bytes)


def write_hf_files(out_dir: str, hf_sd: Dict[str, torch.Tensor], hf_config: dict,
                   tokenizer_dir: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> None:
    groups, current, size = [], {}, 0
    for name, t in hf_sd.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    groups.append(current)
    if len(groups) == 1:
        save_file(groups[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(g, os.path.join(out_dir, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in g})
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_config, fh, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
