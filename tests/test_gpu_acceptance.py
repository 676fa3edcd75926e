"""benchmarks/gpu_acceptance.py without a GPU: its --help and --dry-run (every check, the FLOPs
formulas with numbers worked out here by hand), the report written whole, the exit status of a
run with a failing check, and the pieces its checks judge with (the FLOPs formula against
torch's FLOP counter, the JUnit reading, the loss and generation comparisons)."""

import importlib.util
import json
import os
import sys

import pytest
import torch

from megatron_vl.testing import acceptance
from megatron_vl.testing.acceptance import BELOW_GOAL, FAIL, NOT_RUN, PASS, TIMEOUT, Check, Result
from megatron_vl.testing.processes import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_acceptance.py")
CHECKS = ["kernels", "varlen", "mfu_1b", "lora_7b", "memory", "stage1", "generation"]


@pytest.fixture
def script(monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))   # it imports its neighbours (bench_*.py)
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env():
    return dict(os.environ, PYTHONPATH=ROOT, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


# --- FLOPs, worked out by hand ------------------------------------------------------------------
def llama_flops(h, layers, heads, kv_heads, ffn, vocab, visual, seq, lora_rank=0):
    """Per trained token, from the architecture alone: projections q,k,v,o, gate, up, down per
    layer, the LM head over the padded vocabulary (a multiple of 128), the visual projection
    (input is data: no input gradient) and regression head; causal attention 6·L·s·a."""
    hd = h // heads
    layer = h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * ffn
    head = -(-vocab // 128) * 128 * h
    attention = 6 * layers * seq * heads * hd
    if not lora_rank:
        return 6 * (layers * layer + head + 2 * visual * h) - 2 * visual * h + attention
    r = lora_rank
    adapters = layers * (r * h + heads * hd * r + 2 * (r * h + kv_heads * hd * r) + r * heads * hd + h * r
                         + 2 * (r * h + ffn * r) + r * ffn + h * r)
    return 4 * (layers * layer + head) + 6 * (adapters + 2 * visual * h) - 2 * visual * h + attention


def test_help_names_every_check_and_flag(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--dry-run", "--only", "--tiny", "--report", "--peak-tflops", "--budget-s"):
        assert flag in out
    for name in CHECKS:
        assert name in out


def test_dry_run_on_cpu_lists_the_checks_and_the_formulas_with_their_numbers(script, capsys):
    # in this process (the script runs as a process in the child-process tests below)
    assert script.main(["--dry-run", "--tiny"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("- ")]
    assert listed == CHECKS
    assert out.count("    runs: ") == len(CHECKS)
    # the tiny preset (hidden 64, 2 layers, 4 heads / 2 KV, FFN 176, 258 tokens, visual 64) at seq 64
    full = llama_flops(64, 2, 4, 2, 176, 258, 64, 64)
    lora = llama_flops(64, 2, 4, 2, 176, 258, 64, 64, lora_rank=4)
    assert (full, lora) == (790_528, 613_120)
    assert f"= {full:,} FLOPs/token" in out and f"= {lora:,} FLOPs/token" in out
    assert "6·N − 2·N_data + 6·L·s·a" in out and "4·N_frozen + 6·N_train − 2·N_data + 6·L·s·a" in out


def test_dry_run_prints_the_1b_and_7b_numbers(script, capsys):
    assert script.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    one_b = llama_flops(2048, 22, 32, 4, 5632, 32002, 1024, 512)
    seven_b = llama_flops(4096, 32, 32, 32, 11008, 32002, 4096, 512, lora_rank=32)
    assert f"= {one_b:,} FLOPs/token" in out and f"= {seven_b:,} FLOPs/token" in out
    assert "(timeout 140 s)" in out and "--fused-kernels require" in out


def test_timeouts_fit_the_eight_minutes(script):
    for tiny in (False, True):
        assert sum(c.timeout for c in script.checks(tiny)) <= script.BUDGET_S <= 480


def test_flops_formula_equals_torchs_count_of_the_real_layer():
    """On the meta device, torch's FLOP counter over one decoder layer's forward and backward
    (full and LoRA) equals the formula: 6 (4 frozen) per weight and token, 12·s·a attention
    (the counter does not halve for the causal mask; the formula's causal=False)."""
    from torch.utils.flop_counter import FlopCounterMode
    from megatron_vl import ops
    from megatron_vl.config import load_config
    from megatron_vl.model.llama import LlamaDecoderLayer
    from megatron_vl.model.lora import apply_lora
    from megatron_vl.parallel.layers import deferred_initialization
    from megatron_vl.parallel.state import ParallelState
    from megatron_vl.plan.flops import AttentionShape, matmul_weights, training_flops
    for lora in (0, 4):
        cfg, _ = load_config(["--model-preset", "tiny", "--lora-rank", str(lora), "--fused-kernels", "torch"])
        m, b, s = cfg.model, 2, 48
        with torch.device("meta"), deferred_initialization():
            layer = LlamaDecoderLayer(m, ParallelState.single())
            if lora:
                apply_lora(layer, cfg.lora, [], 0, lambda n: n)
            # the layer's input needs a gradient (the layers below train) as inside the model
            x = torch.empty(b, s, m.hidden_size, requires_grad=True)
            cos, sin = ops.rope_cos_sin(torch.arange(s).expand(b, s), ops.rope_inv_freq(m.head_dim, m.rotary_base),
                                        torch.float32)
            with FlopCounterMode(display=False) as counter:
                layer(x, cos, sin).sum().backward()
            with FlopCounterMode(display=False) as forward, torch.no_grad():
                layer(x, cos, sin)
        weights = matmul_weights(layer)
        assert (weights.frozen > 0) == bool(lora) and weights.data_input == 0
        shape = AttentionShape(1, s, m.num_attention_heads * m.head_dim, causal=False)
        assert counter.get_total_flops() == b * s * training_flops(weights, shape)
        # recomputation adds one forward
        assert forward.get_total_flops() == b * s * (training_flops(weights, shape, recompute=True)
                                                     - training_flops(weights, shape))


def test_planner_flops_read_the_same_formula():
    """The planner's counts (every parameter) as matmul weights differ from the exact ones by
    the norms, biases and LoRA's row deltas only."""
    from megatron_vl.config import load_config
    from megatron_vl.plan.counts import rank_parameters
    from megatron_vl.plan.flops import model_weights, weights_from_counts
    for lora in (0, 4):
        cfg, _ = load_config(["--model-preset", "tiny", "--lora-rank", str(lora)])
        m = cfg.model
        c = rank_parameters(cfg, 1, 1, 1, 1)[0]
        approx = weights_from_counts(c["trainable_slice"], c["frozen_slice"], m)
        exact = model_weights(cfg)
        elementwise = (2 * m.num_layers + 1) * m.hidden_size + m.hidden_size + m.visual_embed_dim
        rows = 2 * 2 * m.hidden_size if lora else 0
        assert approx.total - exact.total == elementwise + rows
        assert approx.data_input == exact.data_input == m.visual_embed_dim * m.hidden_size


# --- the run's frame ---------------------------------------------------------------------------
def fake_run(statuses):
    def run_one(check, timeout):
        return Result(check.name, statuses[check.name], f"{check.name} says {statuses[check.name]}",
                      details={"timeout": timeout})
    return run_one


def args_for(script, tmp_path, *extra):
    return script.build_parser().parse_args(["--report", str(tmp_path / "report.json"), *extra])


@pytest.mark.parametrize("statuses,code", [
    ({"a": PASS, "b": PASS}, 0),
    ({"a": PASS, "b": BELOW_GOAL}, 0),
    ({"a": PASS, "b": FAIL}, 1),
    ({"a": TIMEOUT, "b": PASS}, 1),
])
def test_exit_status_and_report_follow_the_checks(script, tmp_path, statuses, code):
    checks = [Check(name, f"check {name}", 30, "nothing") for name in statuses]
    lines = []
    assert script.run(args_for(script, tmp_path), checks, fake_run(statuses), log=lines.append) == code
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(c["name"], c["status"]) for c in report["checks"]] == list(statuses.items())
    assert report["exit_code"] == code and report["meta"]["device"] == "cpu"
    table = "\n".join(lines)
    for name, status in statuses.items():
        assert f"{name} says {status}" in table
    assert ("FAILED" in table) == bool(code)
    assert os.listdir(tmp_path) == ["report.json"]   # no temporary file left


def test_only_runs_the_named_check(script, tmp_path):
    args = args_for(script, tmp_path, "--only", "varlen")
    seen = []
    script.run(args, None, lambda check, timeout: seen.append(check.name) or Result(check.name, PASS, "ok"),
               log=lambda line: None)
    assert seen == ["varlen"]


def test_budget_leaves_later_checks_not_run():
    now = [0.0]

    def run_one(check, timeout):
        now[0] += 50
        return Result(check.name, PASS, "ok", details={"timeout": timeout})
    checks = [Check(n, n, 40, "") for n in "abc"]
    results = acceptance.run_checks(checks, run_one, budget_s=65, log=lambda line: None, clock=lambda: now[0])
    assert [r.status for r in results] == [PASS, PASS, NOT_RUN]
    assert [r.details.get("timeout") for r in results[:2]] == [40, 15]   # the second got what was left
    assert acceptance.exit_code(results) == 1


def test_a_check_that_raises_is_a_failed_row():
    def run_one(check, timeout):
        raise RuntimeError("CUDA error: an illegal memory access\nmore")
    results = acceptance.run_checks([Check("x", "x", 10, "")], run_one, 100, log=lambda line: None)
    assert (results[0].status, results[0].summary) == (FAIL, "RuntimeError: CUDA error: an illegal memory access")


def test_a_check_failing_in_its_child_process_fails_the_run(script, tmp_path):
    """Through the real child process: an unknown check fails in the child (its error is the
    row), and one whose time runs out is killed and reported as a timeout."""
    args = args_for(script, tmp_path, "--tiny")
    checks = [Check("no_such_check", "fails in the child", 120, ""), Check("generation", "too slow", 1, "")]
    assert script.run(args, checks, log=lambda line: None) == 1
    rows = json.loads((tmp_path / "report.json").read_text())["checks"]
    assert rows[0]["status"] == FAIL and rows[0]["summary"] == "ValueError: no check named no_such_check"
    assert rows[1]["status"] == TIMEOUT


def test_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "gpu_report.json"
    acceptance.write_report(str(path), [Result("a", PASS, "fine", 1.5, {"x": [1, 2]})], {"device": "cpu"})
    report = json.loads(path.read_text())
    assert report == {"meta": {"device": "cpu"}, "exit_code": 0,
                      "checks": [{"name": "a", "status": PASS, "summary": "fine", "seconds": 1.5,
                                  "details": {"x": [1, 2]}}]}

    def broken_dump(obj, fh, **kw):
        fh.write('{"meta": ')
        raise OSError("disk full")
    monkeypatch.setattr(acceptance.json, "dump", broken_dump)
    with pytest.raises(OSError):
        acceptance.write_report(str(path), [Result("b", FAIL, "x")], {})
    assert json.loads(path.read_text()) == report        # the earlier report, untouched
    assert os.listdir(tmp_path) == ["gpu_report.json"]   # and no half-written file beside it


# --- what the checks judge with ------------------------------------------------------------------
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_kernel_parity" name="test_gpu_kernel[rope-bfloat16]" time="0.1"/>
<testcase classname="tests.test_kernel_parity" name="test_gpu_kernel[attention_varlen-bfloat16]" time="0.1">
  <failure message="AssertionError: max error 0.5 over 0.01">trace</failure></testcase>
<testcase classname="tests.test_ops" name="test_fused_rms_norm_rope_swiglu_match_reference" time="0.1"/>
<testcase classname="tests.test_kernel_parity" name="test_gpu_kernel[ce-bfloat16]" time="0.1"/>
<testcase classname="tests.test_pretrain_gpu" name="test_fused_kernels_match_torch_on_cuda[bf16]" time="1">
  <skipped message="needs CUDA (marked gpu)"/></testcase>
</testsuite></testsuites>"""


def test_kernel_outcomes_per_test_and_per_kernel(tmp_path):
    from megatron_vl.testing.gpu_checks import junit_outcomes, kernel_verdicts
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    outcomes = junit_outcomes(str(path))
    assert [(o["id"].split("::")[1], o["outcome"]) for o in outcomes] == [
        ("test_gpu_kernel[rope-bfloat16]", "passed"), ("test_gpu_kernel[attention_varlen-bfloat16]", "failed"),
        ("test_fused_rms_norm_rope_swiglu_match_reference", "passed"), ("test_gpu_kernel[ce-bfloat16]", "passed"),
        ("test_fused_kernels_match_torch_on_cuda[bf16]", "skipped")]
    assert outcomes[1]["message"] == "AssertionError: max error 0.5 over 0.01"
    status, summary, details = kernel_verdicts(outcomes)
    assert status == FAIL and summary.startswith("2 of 5 not passed")
    assert details["per_kernel"] == {"rope": "2/2", "attention": "0/1", "rms_norm": "1/1", "swiglu": "1/1",
                                     "cross_entropy": "1/1", "pretrain": "0/1"}   # "reference" is no CE
    assert kernel_verdicts([dict(o, outcome="passed") for o in outcomes])[0] == PASS
    assert kernel_verdicts([dict(o, outcome="skipped") for o in outcomes])[0] == FAIL   # proves nothing
    assert kernel_verdicts([])[0] == FAIL


def test_loss_comparison_accepts_rounding_and_refuses_drift():
    from megatron_vl.testing.loss_parity import TOLERANCES, check_losses, compare_losses
    reference = [5.6, 5.2, 4.9, 4.5, 4.1]
    close = [5.61, 5.25, 4.95, 4.55, 4.15]                     # 0.18% then ~1%: bf16's room
    assert check_losses(close, reference, TOLERANCES["bf16"], "bf16").ok
    with pytest.raises(AssertionError, match="step 1 over tolerance"):
        check_losses([5.65] + reference[1:], reference, TOLERANCES["bf16"], "bf16")   # 0.9% at step 1
    result = compare_losses([v * 1.03 if i == 3 else v for i, v in enumerate(reference)], reference,
                            TOLERANCES["bf16"])
    assert (result.ok, result.failing_step, result.worst_step) == (False, 4, 4)
    assert not compare_losses(close, reference, TOLERANCES["fp16"]).ok           # fp16 is held tighter
    for bad in ([5.6], [5.6, float("nan"), 4.9, 4.5, 4.1]):
        with pytest.raises(ValueError):
            compare_losses(bad, reference, TOLERANCES["bf16"])


class _Logits:
    def __init__(self, values):
        self.regression = torch.nn.Linear(1, 1)
        self.values = torch.tensor(values)

    def __call__(self, ids):
        return type("Out", (), {"logits": self.values.view(1, 1, -1).expand(1, ids.shape[1], -1)})()


def test_generations_may_part_only_at_a_bf16_tie():
    from megatron_vl.inference.decode_loop import Prompt
    from megatron_vl.testing.gpu_generation import _first_difference
    prompt = Prompt([1, 2], [None, None])
    tie = _Logits([0.0, 10.0, 9.8, -3.0])          # tokens 1 and 2: 0.2 apart, 2% of the largest
    assert _first_difference(tie, prompt, [1, 1, 1], [1, 1, 1], 0.03)["first_difference"] is None
    row = _first_difference(tie, prompt, [1, 1, 1], [1, 2, 2], 0.03)
    assert (row["first_difference"], row["ok"]) == (1, True)
    far = _first_difference(_Logits([0.0, 10.0, 6.0, -3.0]), prompt, [1, 1], [1, 2], 0.03)
    assert not far["ok"] and "logits 4 apart" in far["why"]
    assert not _first_difference(tie, prompt, [1, 1], [1], 0.03)["ok"]   # lengths differ


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_check_runs_at_tiny_sizes_on_cpu(tmp_path):
    """The whole script with --tiny: every check's code path runs here; only the GPU tests, all
    skipped without CUDA, fail (so the exit status is 1). Each check's child command runs in one
    process (tests/gpu_acceptance_one_process.py: seven interpreters' imports saved); the child
    process itself is test_a_check_failing_in_its_child_process_fails_the_run's."""
    report = tmp_path / "report.json"
    done = run_script([sys.executable, os.path.join(ROOT, "tests", "gpu_acceptance_one_process.py"), "--tiny",
                       "--report", report], cwd=str(tmp_path), timeout=500,
                      env=dict(env(), PYTHONPATH=os.pathsep.join([ROOT, os.path.dirname(SCRIPT)])))
    rows = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    assert done.returncode == 1 and list(rows) == CHECKS, done.output[-3000:]
    assert rows["kernels"]["status"] == FAIL and "skipped" in rows["kernels"]["summary"]
    assert all(rows[n]["status"] == PASS for n in CHECKS[1:]), {n: rows[n]["summary"] for n in CHECKS[1:]}
    assert rows["varlen"]["details"]["comparison"]["max_abs"] == 0.0
    assert [r["error"] for r in rows["memory"]["details"]["rows"]] and \
        all(abs(r["error"]) <= 0.10 for r in rows["memory"]["details"]["rows"])
