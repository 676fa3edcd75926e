"""LoRA for the tensor-parallel projections, applied from outside the model.

peft wraps ``nn.Linear``; our projections are column/row-parallel and some are fused (q,k,v
in one matrix; gate,up in one), so the adapters here are parallel-aware and kept per logical
projection — the same A/B matrices peft would hold for HF's q_proj, k_proj, ... (the HF
export writes them in peft's format).

- Column-parallel (q, k, v, gate, up): A [r, in] replicated, B [out/tp, r] split like the
  base rows. The gradient of A sums every rank's B slice, so A's output goes through
  ``copy_to_group`` (identity forward, all-reduce backward).
- Row-parallel (o, down): A [r, in/tp] split like the base columns, its output all-reduced;
  B [out, r] replicated.

With LoRA the base is frozen; the visual projection, the regression head and the rows of
the new tokens (``[IMG]``, ``[/IMG]``) in the embedding and LM head still train — the rows
through zero-initialised deltas added to the frozen tables.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, Iterable, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear, shard_parts
from ..parallel.mappings import copy_to_group, group_rank, group_size, reduce_from_group
from .llama import LlamaAttention, LlamaMLP
from .vlgpt import VLGPTEmbedding, VLGPTHead

# Our fused projection -> its logical parts (HF names: q_proj, ..., down_proj).
PARTS = {"qkv": ["q", "k", "v"], "out": ["o"], "gate_up": ["gate", "up"], "down": ["down"]}
HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _tp(param: nn.Parameter, dim: int) -> nn.Parameter:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    return param


def _shape(weight: torch.Tensor) -> torch.Size:
    """The base weight's shape on this TP rank, also when ZeRO-3 built it partitioned."""
    return getattr(weight, "ds_shape", weight.shape)


def _init_a(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """peft's lora_A init (kaiming-uniform, a=sqrt(5)) from a generator keyed by the global
    name, so any TP/PP layout starts from the same adapters."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    full = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
    return full


class LoraColumnParallelLinear(nn.Module):
    def __init__(self, base: ColumnParallelLinear, parts: List[str], targets: Sequence[str], cfg: LoraConfig,
                 seed: int, global_name: str):
        super().__init__()
        self.base, self.parts, self.group = base, parts, base.tp_group
        self.local_output_sizes = base.local_output_sizes
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.dropout = nn.Dropout(cfg.lora_dropout)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for part, size in zip(parts, self.local_output_sizes):
            if part in targets:
                a = _init_a(cfg.lora_rank, _shape(base.weight)[1], seed, f"{global_name}.{part}")
                self.lora_A[part] = nn.Parameter(a.to(base.weight.dtype))
                self.lora_B[part] = _tp(nn.Parameter(base.weight.new_zeros(size, cfg.lora_rank)), 0)

    def forward(self, x):
        out = self.base(x)
        if not len(self.lora_A):
            return out
        pieces = list(out.split(self.local_output_sizes, dim=-1))
        h = self.dropout(x)
        for i, part in enumerate(self.parts):
            if part in self.lora_A:
                low = copy_to_group(F.linear(h, self.lora_A[part]), self.group)
                pieces[i] = pieces[i] + F.linear(low, self.lora_B[part]) * self.scale
        return torch.cat(pieces, dim=-1)


class LoraRowParallelLinear(nn.Module):
    def __init__(self, base: RowParallelLinear, part: str, cfg: LoraConfig, seed: int, global_name: str):
        super().__init__()
        self.base, self.part, self.group = base, part, base.tp_group
        self.scale = cfg.lora_alpha / cfg.lora_rank
        self.dropout = nn.Dropout(cfg.lora_dropout)
        world, rank = group_size(self.group), group_rank(self.group)
        full = _init_a(cfg.lora_rank, _shape(base.weight)[1] * world, seed, f"{global_name}.{part}")
        a = shard_parts(full, [full.shape[1]], rank, world, dim=1)
        self.lora_A = nn.ParameterDict({part: _tp(nn.Parameter(a.to(base.weight.dtype)), 1)})
        self.lora_B = nn.ParameterDict({part: nn.Parameter(base.weight.new_zeros(_shape(base.weight)[0],
                                                                                 cfg.lora_rank))})

    def forward(self, x):
        low = reduce_from_group(F.linear(self.dropout(x), self.lora_A[self.part]), self.group)
        return self.base(x) + F.linear(low, self.lora_B[self.part]) * self.scale


def _row_index(vocab_rows: int, offset: int, token_ids: Sequence[int]) -> torch.Tensor:
    """vocabulary row (of this slice) -> 1 + its position in token_ids, 0 for other rows."""
    index = torch.zeros(vocab_rows, dtype=torch.long, device="cpu")   # also when built on the meta device
    for k, t in enumerate(token_ids):
        if offset <= t < offset + vocab_rows:
            index[t - offset] = k + 1
    return index


class TrainableRowsEmbedding(nn.Module):
    """A frozen (vocab-parallel) embedding plus trainable deltas for a few token rows."""

    def __init__(self, base: nn.Module, token_ids: Sequence[int], hidden: int):
        super().__init__()
        self.base = base
        vocab = _shape(base.word_embeddings.weight)[0] * group_size(base.word_embeddings.tp_group)
        self.register_buffer("row_index", _row_index(vocab, 0, token_ids), persistent=False)
        self.rows_delta = nn.Parameter(base.word_embeddings.weight.new_zeros(len(token_ids), hidden))

    def forward(self, ids):
        table = torch.cat([self.rows_delta.new_zeros(1, self.rows_delta.shape[1]), self.rows_delta])
        return self.base(ids) + F.embedding(self.row_index[ids], table)


class TrainableRowsOutput(nn.Module):
    """A frozen column-parallel LM head whose rows for a few tokens train through a delta.
    Neither forward nor the fused loss (``weight_and_rows``) copies the head: the delta's
    logits are added to those rows' columns. ``weight`` builds the effective weight (a copy of
    the head) for whoever needs it whole."""

    def __init__(self, base: ColumnParallelLinear, token_ids: Sequence[int]):
        super().__init__()
        self.base, self.group = base, base.tp_group
        local = _shape(base.weight)[0]
        index = _row_index(local, group_rank(self.group) * local, token_ids)
        self.register_buffer("local_rows", torch.nonzero(index).flatten(), persistent=False)
        self.register_buffer("delta_rows", index[self.local_rows] - 1, persistent=False)
        self.rows_delta = nn.Parameter(base.weight.new_zeros(len(token_ids), _shape(base.weight)[1]))

    @property
    def weight(self):
        # Each rank adds the rows its vocabulary slice holds; copy_to_group sums the
        # per-rank gradients so every rank's replicated delta sees the full gradient.
        delta = copy_to_group(self.rows_delta, self.group)[self.delta_rows]
        w = self.base.weight
        return w.index_put((self.local_rows,), w[self.local_rows] + delta)

    def weight_and_rows(self):
        """For the fused LM-head loss: the frozen weight as it is, and (local rows, their delta),
        so the loss adds the delta's logits itself instead of copying the head every step."""
        return self.base.weight, (self.local_rows, copy_to_group(self.rows_delta, self.group)[self.delta_rows])

    def forward(self, x):
        x = copy_to_group(x, self.group)
        _, (rows, delta) = self.weight_and_rows()
        # In place on the matmul's output (its backward does not read it): h·W + h·delta for the rows.
        return F.linear(x, self.base.weight).index_add_(-1, rows, F.linear(x, delta))


def apply_lora(model: nn.Module, cfg: LoraConfig, new_token_ids: Sequence[int], seed: int,
               global_name: Callable[[str], str]) -> Dict[str, int]:
    """Freezes `model` and adds the trainable parts (in place). global_name maps a module
    name of this stage to its layout-independent name (seeds the adapters). Returns counts
    of trainable and frozen parameters."""
    unknown = set(cfg.lora_target_modules) - set(HF_PROJ)
    if unknown:
        raise ValueError(f"--lora-target-modules: unknown {sorted(unknown)}; choose from {list(HF_PROJ)}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(cfg.lora_target_modules)
    for name, module in list(model.named_modules()):
        if isinstance(module, (LlamaAttention, LlamaMLP)):
            for attr in ("qkv", "out") if isinstance(module, LlamaAttention) else ("gate_up", "down"):
                parts = PARTS[attr]
                if not targets & set(parts):
                    continue
                base = getattr(module, attr)
                gname = global_name(f"{name}.{attr}")
                if isinstance(base, ColumnParallelLinear):
                    wrapped = LoraColumnParallelLinear(base, parts, targets, cfg, seed, gname)
                else:
                    wrapped = LoraRowParallelLinear(base, parts[0], cfg, seed, gname)
                setattr(module, attr, wrapped)
        elif isinstance(module, VLGPTEmbedding):
            module.visual_proj.requires_grad_(True)
            if new_token_ids:
                module.text = TrainableRowsEmbedding(module.text, new_token_ids, module.visual_proj.out_features)
        elif isinstance(module, VLGPTHead):
            module.regression.requires_grad_(True)
            if new_token_ids:
                if module.lm._tied is not None:
                    raise ValueError("LoRA with tied embeddings is not supported (LLaMA unties them)")
                module.lm.output = TrainableRowsOutput(module.lm.output, new_token_ids)
    return parameter_counts(model.parameters())


def parameter_counts(params: Iterable[nn.Parameter]) -> Dict[str, int]:
    counts = {"trainable": 0, "frozen": 0}
    for p in params:
        n = getattr(p, "ds_numel", p.numel())
        counts["trainable" if p.requires_grad else "frozen"] += n
    return counts
