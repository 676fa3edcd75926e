"""One command that proves a GPU: the fused kernels against their references, MFU of a ~1B
LLaMA and of VL-GPT 7B with LoRA, the planner's memory against the allocator's peak, flash
varlen against SDPA over training steps, a stage-1 step, and batched against one-by-one
generation, all in bf16, in at most 8 minutes on one H100. Prints a table and writes
gpu_report.json (--report). Installs nothing: it needs what the README's GPU set-up installs
(pip install -e .[gpu]: flash-attn, liger-kernel).

    python benchmarks/gpu_acceptance.py                 # every check (one CUDA device)
    python benchmarks/gpu_acceptance.py --dry-run       # the checks, what each runs, the FLOPs formulas (no GPU needed)
    python benchmarks/gpu_acceptance.py --only varlen   # one check
    python benchmarks/gpu_acceptance.py --tiny          # every check at tiny sizes: the code paths, on CPU too

Each check runs in a child process under its own timeout (the table says which ran out).
Exit status 1 when a check failed, timed out or was not run; a measured figure short of its
goal (MFU >= 50%, planner within 10%) is "below goal" in the table and the report and fails
nothing by itself. MFU = model FLOPs per token (megatron_vl/plan/flops.py, printed with the
numbers) x tokens/s / the card's dense bf16 peak (--peak-tflops, else by the device's name).
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

from megatron_vl.testing import acceptance
from megatron_vl.testing.acceptance import FAIL, PASS, Check, Result
from megatron_vl.testing.bench import add_smoke_flag
from megatron_vl.testing.processes import ScriptTimeout, run_script
from megatron_vl.testing.scripts import CHECKOUT

BUDGET_S = 470          # all checks: 8 minutes less this script's start-up and report
GPU_TESTS = ("tests/test_ops.py", "tests/test_kernel_parity.py", "tests/test_pretrain_gpu.py")
TRAIN = ("--bf16", "--train-iters", 1000, "--lr", "1e-4", "--zero-stage", 1)
LLAMA_1B = ("--hidden-size", 2048, "--num-layers", 22, "--num-attention-heads", 32, "--num-query-groups", 4,
            "--ffn-hidden-size", 5632, "--vocab-size", 32002, "--visual-embed-dim", 1024, "--seq-length", 512)
VLGPT_7B_LORA = ("--model-preset", "vlgpt-7.5b", "--lora-rank", 32, "--lora-alpha", 64)
LORA_3B = ("--hidden-size", 3072, "--num-layers", 26, "--num-attention-heads", 24, "--ffn-hidden-size", 8192,
           "--vocab-size", 32002, "--visual-embed-dim", 3072, "--seq-length", 512, "--lora-rank", 32, "--lora-alpha", 64)
SMALL = ("--hidden-size", 1024, "--num-layers", 8, "--num-attention-heads", 16, "--num-query-groups", 4,
         "--ffn-hidden-size", 2816, "--vocab-size", 32002, "--visual-embed-dim", 256, "--seq-length", 512,
         "--micro-batch-size", 4)
TINY = ("--model-preset", "tiny", "--seq-length", 64)
TINY_LORA = TINY + ("--lora-rank", 4, "--lora-alpha", 8)
MEMORY_LAYOUTS = {"ZeRO-0": ("--zero-stage", 0), "ZeRO-1": ("--zero-stage", 1), "ZeRO-2": ("--zero-stage", 2),
                  "ZeRO-3": ("--zero-stage", 3), "ZeRO-1 LoRA r=16": ("--zero-stage", 1, "--lora-rank", 16),
                  "ZeRO-1 recompute": ("--zero-stage", 1, "--recompute-activations")}
SIZES = {   # per profile: micro-batches tried, timed steps after warm-up, stage 1, generation
    False: dict(one_b=(("~1B LLaMA", LLAMA_1B),), seven_b=(("VL-GPT 7B LoRA r=32", VLGPT_7B_LORA),
                                                             ("~3B LoRA r=32 (7B did not fit)", LORA_3B)),
                micro_1b=(8, 16, 32), micro_7b=(4, 8, 16), steps=4, warmup=2, small=SMALL,
                stage1=dict(image_size=224, clip_width=256, ip_width=512, ip_layers=8, text_width=256, pairs=128,
                            micro_batch=16, iters=8, window=2),
                generation=dict(hidden=1024, layers=8, heads=16, vocab=32002, image_tokens=32, visual_dim=256,
                                prompt_lengths=(3, 20, 57, 130), new_tokens=32)),
    True: dict(one_b=(("tiny", TINY),), seven_b=(("tiny LoRA r=4", TINY_LORA),), micro_1b=(1, 2), micro_7b=(1, 2),
               steps=1, warmup=1, small=TINY + ("--micro-batch-size", 2),
               stage1=dict(image_size=32, clip_width=32, ip_width=32, ip_layers=1, text_width=32, pairs=8,
                           micro_batch=2, iters=2, window=1),
               generation=dict(hidden=64, layers=2, heads=4, vocab=258, image_tokens=4, visual_dim=16,
                               prompt_lengths=(2, 5, 9), new_tokens=6)),
}
STAGE1_MODEL = dict(visual_embed_dim=64, num_image_tokens=32, tokenizer_heads=2, detokenizer_width=64,
                    detokenizer_heads=4, detokenizer_layers=2)


def describe(flags) -> str:
    return " ".join(map(str, flags))


def stage1_flags(settings: dict) -> list:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def kernel_choice(tiny: bool) -> str:
    return "auto" if tiny else "require"   # require: the fused kernels or an error, on CUDA only


def checks(tiny: bool):
    """The checks in the order they run, with their timeouts (seconds; they sum under BUDGET_S)."""
    s, k = SIZES[tiny], kernel_choice(tiny)
    return [
        Check("kernels", "the GPU tests (--fused-kernels require): pass/fail per kernel", 140,
              f"python -m pytest -m gpu {' '.join(GPU_TESTS)} -rA --junitxml=<tmp>"),
        Check("varlen", "flash varlen vs SDPA (document-isolated): lm losses over 10 bf16 steps", 40,
              f"{describe(s['small'])} {describe(TRAIN)} --reset-attention-mask, 3 documents per row; "
              f"--fused-kernels {k} then torch, same seed and batches"),
        Check("mfu_1b", "MFU of a ~1B LLaMA, seq 512, bf16, best micro-batch (goal >= 50%)", 55,
              f"{describe(s['one_b'][0][1])} {describe(TRAIN)} --fused-kernels {k}; micro-batches {s['micro_1b']}"),
        Check("lora_7b", "VL-GPT 7B with LoRA on one GPU, seq 512 (goal >= 50% MFU by the LoRA formula)", 80,
              f"{describe(s['seven_b'][0][1])} {describe(TRAIN)} --fused-kernels {k}; micro-batches "
              f"{s['micro_7b']}" + (f"; if it does not fit: {describe(LORA_3B)}" if not tiny else "")),
        Check("memory", "planner's peak vs torch.cuda.max_memory_allocated, 3 steps (goal within 10%)", 75,
              f"{describe(s['small'])} {describe(TRAIN)}, layouts: "
              + "; ".join(f"{n} ({describe(f)})" for n, f in MEMORY_LAYOUTS.items())),
        Check("stage1", "a stage-1 step in bf16: images/s, FLOPs per image", 40,
              f"train_tokenizer.py --bf16 {describe(stage1_flags(STAGE1_MODEL))} on bench_tokenizer_step's random "
              f"CLIP/SD/IP-Adapter ({s['stage1']})"),
        Check("generation", "batched vs one-by-one generation in bf16 (text, and text-to-image)", 30,
              f"megatron_vl.inference.generation.generate, greedy, random VLGPTForCausalLM {s['generation']}"),
    ]


def flops_text(tiny: bool) -> str:
    """The FLOPs formulas with the numbers of the two MFU shapes (built on the meta device)."""
    from megatron_vl.config import load_config
    from megatron_vl.plan.flops import attention_shape, formula, model_weights
    s = SIZES[tiny]
    lines = ["FLOPs per trained token (megatron_vl/plan/flops.py); N: the matmul weights of the model as training "
             "builds it (meta device), L layers, s tokens, a = query heads x head size:",
             "  full training: 6·N − 2·N_data + 6·L·s·a   (forward 2N, input gradients 2N, weight gradients 2N; "
             "N_data: the visual projection, whose input is data, has no input gradient)",
             "  LoRA:          4·N_frozen + 6·N_train − 2·N_data + 6·L·s·a   (frozen base: forward + input "
             "gradient; N_train: adapters, visual projection, regression head)",
             "  attention:     12·s·a per layer forward+backward, halved for the causal mask: 6·L·s·a (PaLM and "
             "Megatron-LM count 12·L·s·a)",
             "  image tokenizer / detokenizer: 0 in stages 2-3 (visual features are precomputed by "
             "tools/extract_image_features.py); stage 1 runs them: the stage1 check counts their FLOPs",
             "  MFU = FLOPs per token x tokens/s / the card's dense bf16 peak"]
    for name, flags in (s["one_b"][0], s["seven_b"][0]):
        cfg, _ = load_config([str(a) for a in flags])
        lines.append(f"  {name} ({describe(flags)}): {formula(model_weights(cfg), attention_shape(cfg.model))}")
    return "\n".join(lines)


# --- the checks, as a child process runs them --------------------------------------------------
def model_batches(cfg, micro: int, n: int, documents: int = 0):
    """n synthetic batches of `micro` samples (bench_pretrain_step's), on this device; timing
    needs no fresh data, so without documents two are drawn and repeated (7B's are 0.3 GB each)."""
    from bench_pretrain_step import synthetic_batches
    from megatron_vl.testing.gpu_checks import device, on_device, with_documents
    shaped = SimpleNamespace(model=cfg.model, training=SimpleNamespace(micro_batch_size=micro))
    drawn = synthetic_batches(shaped, n if documents else min(n, 2))
    out = [drawn[i % len(drawn)] for i in range(n)]
    if documents:
        out = [with_documents(b, documents, seed=i) for i, b in enumerate(out)]
    return [on_device(b, device(), cfg.training.torch_dtype) for b in out]


def stage1_check(sizes: dict):
    import bench_tokenizer_step as bench
    from megatron_vl.stage1.config import TokenizerModelConfig
    from megatron_vl.testing.gpu_checks import stage1_flops_per_image
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_stage1_") as root:
        shards = bench.make_inputs(root, SimpleNamespace(**sizes))
        paths = dict(clip_model=os.path.join(root, "clip"), sd_model=os.path.join(root, "sd"),
                     ip_adapter=os.path.join(root, "ip"), ip_adapter_weight=bench.IP_WEIGHT)
        out = bench.run([sys.executable, "train_tokenizer.py", *stage1_flags({**paths, **STAGE1_MODEL}), "--train-shards", shards, "--bf16",
                         "--micro-batch-size", sizes["micro_batch"], "--train-iters", sizes["iters"],
                         "--log-interval", sizes["window"], "--shuffle-buffer", 32])
        per_image = stage1_flops_per_image(TokenizerModelConfig(**paths, **STAGE1_MODEL))
    losses = [(float(a), float(b)) for a, b in re.findall(r"image loss: (\S+) \| text loss: (\S+)", out)]
    rates = [float(x) for x in re.findall(r"images/s: ([0-9.]+)", out)]
    if not losses or not all(v == v and abs(v) != float("inf") for pair in losses for v in pair):
        return FAIL, f"losses not finite or not logged: {losses}", {"output_tail": out[-3000:]}
    rate = statistics.median(rates[1:] or rates)
    return PASS, (f"{rate:.1f} images/s at micro {sizes['micro_batch']}, {per_image / 1e9:.2f} GFLOPs per image "
                  f"(tokenizer + detokenizer, counted) = {rate * per_image / 1e12:.2f} TFLOP/s; last losses image "
                  f"{losses[-1][0]:.4f}, text {losses[-1][1]:.4f}"), \
        {"images_per_s": rate, "flops_per_image": per_image, "losses": losses}


def run_body(name: str, args):
    from megatron_vl.testing import gpu_checks as g
    s, k = SIZES[args.tiny], kernel_choice(args.tiny)
    train = lambda flags: (*flags, *TRAIN, "--fused-kernels", k)   # noqa: E731
    if name == "kernels":
        return g.kernels_check(GPU_TESTS, max(args.time_limit - 15, 30))
    if name == "varlen":
        return g.kernel_pair_check((*s["small"], *TRAIN, "--reset-attention-mask"), (k, "torch"),
                                   lambda cfg, micro, n: model_batches(cfg, micro, n, documents=3), 10)
    if name in ("mfu_1b", "lora_7b"):
        shapes = s["one_b"] if name == "mfu_1b" else s["seven_b"]
        return g.mfu_check([(n, train(f)) for n, f in shapes], s["micro_1b" if name == "mfu_1b" else "micro_7b"],
                           model_batches, s["steps"], s["warmup"], g.peak_tflops(args.peak_tflops))
    if name == "memory":
        return g.memory_check((*s["small"], *TRAIN, "--fused-kernels", k), MEMORY_LAYOUTS, model_batches)
    if name == "stage1":
        return stage1_check(s["stage1"])
    if name == "generation":
        from megatron_vl.testing.gpu_generation import generation_check
        return generation_check(**s["generation"])
    raise ValueError(f"no check named {name}")


def run_check(name: str, args) -> int:
    """Child mode: one check; its result (JSON) to --result-file, or printed."""
    t0 = time.monotonic()
    try:
        status, summary, details = run_body(name, args)
    except (Exception, SystemExit) as exc:   # bench_tokenizer_step exits with a message on failure
        status, summary = FAIL, (f"{type(exc).__name__}: {exc}".strip().splitlines() or [""])[0][:300]
        details = {"traceback": traceback.format_exc()[-4000:]}
    result = {"name": name, "status": status, "summary": summary, "seconds": round(time.monotonic() - t0, 1),
              "details": details}
    text = json.dumps(result, indent=1, default=str)
    if args.result_file:
        with open(args.result_file, "w") as fh:
            fh.write(text)
    else:
        print(text)
    return 0


# --- the parent ---------------------------------------------------------------------------------
def child_env():
    import torch
    return dict(os.environ, PYTHONPATH=CHECKOUT, TOKENIZERS_PARALLELISM="false",
                DS_ACCELERATOR="cuda" if torch.cuda.is_available() else os.environ.get("DS_ACCELERATOR", "cpu"))


def run_in_child(check: Check, timeout: float, args) -> Result:
    """The check in `python gpu_acceptance.py --run-check NAME` under `timeout`: its result file,
    or a failure with the end of its output."""
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as tmp:
        result_file = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--run-check", check.name, "--result-file", result_file,
               "--time-limit", f"{timeout:.0f}"] + (["--tiny"] if args.tiny else []) \
            + ([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else [])
        try:
            done = run_script(cmd, cwd=CHECKOUT, env=child_env(), timeout=timeout, merge_stderr=True)
        except ScriptTimeout as exc:
            return Result(check.name, acceptance.TIMEOUT, f"ran past {timeout:.0f} s (killed with all it started)",
                          details={"output_tail": str(exc)[-3000:]})
        if os.path.isfile(result_file):
            with open(result_file) as fh:
                return Result(**json.load(fh))
        tail = (done.stdout or "").strip().splitlines()
        return Result(check.name, FAIL, f"exited {done.returncode} without a result: {tail[-1] if tail else ''}"[:300],
                      details={"output_tail": "\n".join(tail[-60:])})


def build_parser():
    names = [c.name for c in checks(False)]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="list every check with what it runs and print the FLOPs formulas with their numbers; run "
                        "nothing (no GPU needed)")
    p.add_argument("--only", action="append", metavar="NAME", choices=names,
                   help=f"run only this check (repeatable): {', '.join(names)}")
    p.add_argument("--tiny", action="store_true",
                   help="tiny models and sizes: the same code paths in seconds, on CPU too (figures mean nothing)")
    p.add_argument("--report", default="gpu_report.json", help="the JSON report (default: %(default)s)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="seconds for all checks; one that would start with under 10 s left is not run "
                        "(default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the card's dense bf16 peak for MFU (default: by the device's name, e.g. H100 989)")
    add_smoke_flag(p, {"dry_run": True, "tiny": True})
    p.add_argument("--run-check", help=argparse.SUPPRESS)      # child mode: one check
    p.add_argument("--result-file", help=argparse.SUPPRESS)
    p.add_argument("--time-limit", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def dry_run(args) -> int:
    selected = [c for c in checks(args.tiny) if not args.only or c.name in args.only]
    print(f"{len(selected)} checks ({'tiny sizes' if args.tiny else 'one CUDA device'}), {args.budget_s:.0f} s "
          "budget, each in a child process under its timeout:")
    for c in selected:
        print(f"- {c.name} (timeout {c.timeout:.0f} s): {c.title}\n    runs: {c.runs}")
    print()
    print(flops_text(args.tiny))
    return 0


def run(args, check_list=None, run_one=None, log=print) -> int:
    """Every check (or --only's) through run_one (default: a child process each); prints the
    table, writes the report; returns the exit status."""
    from megatron_vl.testing.gpu_checks import device_name, peak_tflops
    check_list = [c for c in (check_list or checks(args.tiny)) if not args.only or c.name in args.only]
    run_one = run_one or (lambda check, timeout: run_in_child(check, timeout, args))
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    formulas = flops_text(args.tiny)
    log(f"device: {device_name()}, peak {peak_tflops(args.peak_tflops) or 'unknown'} TFLOP/s; {started}")
    log(formulas)
    results = acceptance.run_checks(check_list, run_one, args.budget_s, log=log)
    log("")
    log(acceptance.table(results))
    acceptance.write_report(args.report, results, {"started": started, "device": device_name(),
                                                   "peak_tflops": peak_tflops(args.peak_tflops), "tiny": args.tiny,
                                                   "budget_s": args.budget_s, "flops": formulas})
    log(f"report: {args.report}")
    return acceptance.exit_code(results)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.dry_run = args.tiny = True
    if args.run_check:
        return run_check(args.run_check, args)
    return dry_run(args) if args.dry_run else run(args)


if __name__ == "__main__":
    sys.exit(main())
