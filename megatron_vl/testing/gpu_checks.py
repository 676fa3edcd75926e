"""The measurements behind benchmarks/gpu_acceptance.py, on whatever device this process has
(CUDA for the real run; the CPU runs them at tiny sizes in the tests): training steps of the
real trainer (build, DeepSpeed engine, VLGPTTrainer.train_step) timed for MFU, the allocator's
peak against the planner, two kernel choices' losses over the same batches, batched against
one-by-one generation, and the GPU tests' per-test outcomes from pytest's JUnit XML.

Every function returns (status, one-line summary, details) for acceptance.Result."""

from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .acceptance import BELOW_GOAL, FAIL, PASS

Outcome = Tuple[str, str, Dict]
KERNEL_WORDS = {"attention": ("attention", "varlen", "flash"), "rms_norm": ("rms_norm", "rmsnorm"),
                "rope": ("rope",), "swiglu": ("swiglu",), "cross_entropy": ("cross_entropy", "ce"),
                "lm_head_loss": ("lm_head", "chunked"), "pretrain": ("pretrain", "fused_kernels_match")}
"""Kernel -> words in a test's id (between non-letters) that put it under that kernel; a test
may name several."""


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """Dense bf16 peak of this device: the override, else training.metrics' table by name."""
    if override:
        return override
    from ..training.metrics import PEAK_TFLOPS
    name = device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if name != "cpu" else None


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- the GPU tests ----------------------------------------------------------------------------
def junit_outcomes(path: str) -> List[Dict]:
    """Per test case of a pytest --junitxml file: id, outcome (passed/failed/error/skipped), message."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        out.append({"id": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                    "message": message})
    return out


def kernel_verdicts(outcomes: Sequence[Dict]) -> Outcome:
    """Pass only when tests ran and every one passed: on a GPU a skipped GPU test proves nothing."""
    if not outcomes:
        return FAIL, "no GPU test ran (none collected)", {"tests": []}
    if all(o["outcome"] == "skipped" for o in outcomes):
        return FAIL, f"all {len(outcomes)} GPU tests skipped ({outcomes[0]['message']})", {"tests": list(outcomes)}
    per_kernel = {}
    for o in outcomes:
        test = o["id"].lower()
        named = [k for k, words in KERNEL_WORDS.items()
                 if any(re.search(rf"(?<![a-z]){w}(?![a-z])", test) for w in words)]
        for kernel in named or ["other"]:
            per_kernel.setdefault(kernel, []).append(o["outcome"])
    counts = {k: f"{v.count('passed')}/{len(v)}" for k, v in per_kernel.items()}
    bad = [o for o in outcomes if o["outcome"] != "passed"]
    summary = ", ".join(f"{k} {c}" for k, c in counts.items())
    if bad:
        first = bad[0]
        summary = f"{len(bad)} of {len(outcomes)} not passed ({first['id']}: {first['outcome']} {first['message']}); " \
                  + summary
    return (FAIL if bad else PASS), summary, {"per_kernel": counts, "tests": list(outcomes)}


# --- the trainer ------------------------------------------------------------------------------
def make_trainer(argv: Sequence, dev: torch.device, on_device: bool):
    """(cfg, VLGPTTrainer) of one rank for pretraining flags `argv` (no data: batches are fed to
    train_step). on_device: the model is built on `dev` and drawn there (N(0, init std), norms 1,
    biases 0), which takes a second for 7B; otherwise build_model's own CPU initialisation,
    what a training run allocates (a minute for 7B)."""
    from ..config import load_config
    from ..model.lora import apply_lora, parameter_counts
    from ..model.vlgpt import VLGPTModel
    from ..parallel.layers import deferred_initialization
    from ..parallel.random import seed_everything
    from ..parallel.state import ParallelState, init_distributed
    from ..training.build import BuiltModel, build_model, initialize_engine
    from ..training.pretrain import VLGPTTrainer, parser
    cfg, _ = load_config([str(a) for a in argv], parser=parser())
    init_distributed("auto", single_process_group=True)
    state = ParallelState.build(1, 1)
    t, v = cfg.training, cfg.model.vocab_size
    tracker = seed_everything(t.seed, device=dev.type)
    if on_device:
        with torch.device(dev), deferred_initialization():
            module = VLGPTModel(cfg.model, state, tracker, t.recompute_activations, t.visual_loss_weight)
        torch.manual_seed(t.seed)
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, cfg.model.init_method_std)
        counts = (apply_lora(module, cfg.lora, [v - 2, v - 1], t.seed, lambda n: n) if cfg.lora.lora_rank
                  else parameter_counts(module.parameters()))
        built = BuiltModel(module.to(dev), False, counts)
    else:
        built = build_model(cfg, state, tracker, [v - 2, v - 1], log=lambda m: None)
        built.module.to(dev)
    engine, _ = initialize_engine(cfg, state, built, 1)
    data = SimpleNamespace(global_batch=t.micro_batch_size, train=None, valid=None)
    return cfg, VLGPTTrainer(cfg, state, engine, built, data, tracker, dev, 1)


def release() -> None:
    """Frees what the caller dropped (a trainer and its engine: `del` them first), so the next
    one starts from an empty allocator."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def on_device(batch: Dict, dev: torch.device, dtype: torch.dtype) -> Dict:
    """A model batch (bench_pretrain_step.synthetic_batches' format) moved to dev, float tensors
    in the training dtype, as training.data.model_batch leaves them."""
    return {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def with_documents(batch: Dict, documents: int, seed: int) -> Dict:
    """The batch packed from `documents` documents per row (random boundaries): segment ids,
    positions restarting per document, and flash-attn's varlen boundaries."""
    from ..ops import documents_from_segments
    b, s = batch["tokens"].shape
    g = torch.Generator().manual_seed(seed)
    segments, positions = torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long)
    for row in range(b):
        cuts = sorted((torch.randperm(s - 2, generator=g)[:documents - 1] + 1).tolist()) + [s]
        start = 0
        for k, end in enumerate(cuts):
            segments[row, start:end] = k
            positions[row, start:end] = torch.arange(end - start)
            start = end
    docs = documents_from_segments(segments)
    return dict(batch, segment_ids=segments, position_ids=positions, cu_seqlens=docs.cu_seqlens,
                max_seqlen=docs.max_seqlen)


def timed_steps(trainer, batches: Sequence[Dict], warmup: int) -> Tuple[float, List[float]]:
    """(median seconds of the steps after `warmup`, every step's lm loss)."""
    times, losses = [], []
    for i, batch in enumerate(batches):
        synchronize()
        t0 = time.perf_counter()
        record = trainer.train_step(iter([batch]))
        losses.append(float(record["losses"][0]))   # reads the device: the step is done
        synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), losses


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --- MFU ----------------------------------------------------------------------------------------
def mfu_check(shapes: Sequence[Tuple[str, Sequence]], micros: Sequence[int],
              batches: Callable[[object, int, int], List[Dict]], steps: int, warmup: int,
              peak: Optional[float], goal: float = 0.5) -> Outcome:
    """Training steps of the first shape (name, flags) that fits, at each micro-batch until one
    runs out of memory: tokens/s, TFLOP/s by plan/flops.py, MFU against `peak`; the best
    micro-batch is the figure, and the shapes that did not fit are named."""
    from ..plan.flops import attention_shape, formula, model_flops_per_token, model_weights
    dev, tried = device(), []
    for name, flags in shapes:
        try:
            cfg, trainer = make_trainer([*flags, "--micro-batch-size", micros[0]], dev, on_device=True)
        except Exception as exc:
            if not is_oom(exc):
                raise
            tried.append(f"{name}: out of memory when built")
            release()
            continue
        per_token = formula(model_weights(cfg), attention_shape(cfg.model))
        flops = model_flops_per_token(cfg)
        rows = []
        for micro in micros:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                seconds, losses = timed_steps(trainer, batches(cfg, micro, warmup + steps), warmup)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                rows.append({"micro": micro, "error": "out of memory"})
                break
            tokens = micro * cfg.model.seq_length / seconds
            tflops = tokens * flops / 1e12
            rows.append({"micro": micro, "step_s": seconds, "tokens_per_s": tokens, "tflops": tflops,
                         "mfu": tflops / peak if peak else None, "losses": losses,
                         "memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None})
        del trainer
        release()
        measured = [r for r in rows if "tflops" in r]
        if not measured:
            tried.append(f"{name}: out of memory at micro-batch {micros[0]}")
            continue
        best = max(measured, key=lambda r: r["tflops"])
        details = {"shape": name, "flops_per_token": flops, "formula": per_token, "peak_tflops": peak, "rows": rows,
                   "best_micro": best["micro"], "mfu": best["mfu"], "not_fitting": tried}
        mfu = f"MFU {best['mfu']:.1%}" if peak else "MFU n/a (no peak: --peak-tflops)"
        summary = (f"{name}: {mfu} at micro {best['micro']} ({best['tflops']:.1f} TFLOP/s, "
                   f"{best['tokens_per_s']:,.0f} tokens/s)" + (f"; {'; '.join(tried)}" if tried else ""))
        if not all(map(_finite, best["losses"])):
            return FAIL, summary + "; non-finite loss", details
        return (BELOW_GOAL if peak and best["mfu"] < goal else PASS), summary, details
    return FAIL, "nothing fits: " + "; ".join(tried), {"not_fitting": tried}


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --- memory -------------------------------------------------------------------------------------
@contextlib.contextmanager
def allocated_peak():
    """Yields a dict whose "peak" is, on exit, the most bytes held in tensors at once inside the
    block above what was held when it began: torch.cuda.max_memory_allocated on CUDA, the CPU
    allocator's counterpart (plan_measure.allocated_peak) otherwise."""
    if not torch.cuda.is_available():
        from .plan_measure import allocated_peak as cpu_peak
        with cpu_peak() as result:
            yield result
        return
    result = {}
    synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    yield result
    synchronize()
    result["peak"] = torch.cuda.max_memory_allocated() - base


def memory_check(flags: Sequence, layouts: Dict[str, Sequence], batches, steps: int = 3,
                 goal: float = 0.10) -> Outcome:
    """Per layout: the allocator's peak from just before the model is built through `steps`
    training steps, above what the process held before (what the device must hold for the run),
    against the planner's bytes for that layout on this device's code paths (plan/model.py GPU,
    or CPU_GLOO here)."""
    from ..config import deepspeed_config, effective_zero_stage
    from ..plan.model import CPU_GLOO, GPU, Layout, total_bytes
    from ..plan.planner import rank_memory
    dev, rows = device(), []
    for name, extra in layouts.items():
        release()
        with allocated_peak() as peak:
            cfg, trainer = make_trainer([*flags, *extra], dev, on_device=False)
            built = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
            timed_steps(trainer, batches(cfg, cfg.training.micro_batch_size, steps), 0)
            del trainer
        measured = peak["peak"]
        t = cfg.training
        layout = Layout(1, 1, 1, effective_zero_stage(cfg), t.micro_batch_size, t.recompute_activations)
        parts = rank_memory(cfg, layout, t.micro_batch_size, deepspeed_config(cfg, 1),
                            GPU if dev.type == "cuda" else CPU_GLOO)
        predicted = total_bytes(parts)
        rows.append({"layout": name, "measured": measured, "predicted": predicted, "error": predicted / measured - 1,
                     "peak_while_building": built is not None and built >= torch.cuda.max_memory_allocated(),
                     "parts": parts})
    worst = max(rows, key=lambda r: abs(r["error"]))
    summary = "; ".join(f"{r['layout']} {r['measured'] / 2**30:.3f}/{r['predicted'] / 2**30:.3f} GiB "
                        f"({r['error']:+.0%}{', peak while building' if r['peak_while_building'] else ''})"
                        for r in rows)
    return (PASS if abs(worst["error"]) <= goal else BELOW_GOAL), "measured/predicted " + summary, {"rows": rows}


# --- flash varlen vs SDPA -----------------------------------------------------------------------
def kernel_pair_check(flags: Sequence, kernels: Tuple[str, str], batches, steps: int) -> Outcome:
    """The same model (same seed) trained on the same document-packed batches with two kernel
    choices: their lm losses step by step (testing/loss_parity.py, bf16 tolerance)."""
    from ..ops import implementations
    from .loss_parity import TOLERANCES, compare_losses
    dev, runs, used = device(), {}, {}
    for choice in kernels:
        cfg, trainer = make_trainer([*flags, "--fused-kernels", choice], dev, on_device=False)
        _, runs[choice] = timed_steps(trainer, batches(cfg, cfg.training.micro_batch_size, steps), 0)
        used[choice] = implementations().get("attention", "?")
        del trainer
        release()
    result = compare_losses(runs[kernels[0]], runs[kernels[1]], TOLERANCES[cfg.training.precision])
    summary = (f"{kernels[0]} (attention: {used[kernels[0]]}) vs {kernels[1]} (attention: {used[kernels[1]]}): "
               f"{result.describe()}")
    return (PASS if result.ok else FAIL), summary, {"losses": runs, "attention": used,
                                                    "comparison": result.__dict__}


def kernels_check(test_files: Sequence[str], timeout: float) -> Outcome:
    """pytest -m gpu on the GPU test files, per-test outcomes from its JUnit XML."""
    import os
    import sys
    import tempfile
    from .processes import run_script
    from .scripts import CHECKOUT
    with tempfile.TemporaryDirectory(prefix="gpu_tests_") as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", *test_files, "-p", "no:cacheprovider", "-q", "-rA",
               f"--junitxml={xml}"]
        done = run_script(cmd, cwd=CHECKOUT, env=dict(os.environ, PYTHONPATH=CHECKOUT), timeout=timeout,
                          merge_stderr=True)
        tail = (done.stdout or "")[-3000:]
        if not os.path.isfile(xml):
            last = tail.strip().splitlines()[-1:] or [""]
            return FAIL, f"pytest exited {done.returncode} without a report: {last[0]}", {"pytest_tail": tail}
        status, summary, details = kernel_verdicts(junit_outcomes(xml))
    details["pytest_tail"] = tail
    return status, summary, details


def stage1_flops_per_image(model_cfg) -> float:
    """FLOPs of one image through a stage-1 training step (forward of the frozen CLIP, forward and
    backward of the tokenizer and detokenizer), counted by torch's FLOP counter on the framework
    train_tokenizer.py builds (stage1/framework.py) for these settings; the target encoders,
    which run only when targets are computed on the fly, are not in it."""
    from torch.utils.flop_counter import FlopCounterMode
    from ..stage1.framework import build_framework
    framework = build_framework(model_cfg, 0)
    size = framework.tokenizer.clip.config.image_size
    d = framework.detokenizer.cfg
    batch = {"pixels": torch.zeros(1, 3, size, size),
             "image_targets": torch.zeros(1, d.image_cond_tokens, d.image_cond_dim),
             "text_targets": torch.zeros(1, d.text_cond_tokens, d.text_cond_dim)}
    with FlopCounterMode(display=False) as counter:
        framework(batch)[0].backward()
    return float(counter.get_total_flops())
