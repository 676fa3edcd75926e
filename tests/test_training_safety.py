"""Training-side safety: --load without a checkpoint, damaged checkpoint files, the bf16 loss
weights, targets across packed documents, document isolation by default, the preemption
recipe, host syncs per step, the required kernels, generation on CUDA."""

import os
import re
import shutil

import pytest
import torch

from megatron_vl.config import load_config
from megatron_vl.data.dataset import PackedDataset
from megatron_vl.data.packing import IGNORE, PackingConfig
from pretrain_helpers import NUM_IMAGE_TOKENS, PY, ROOT, logged_losses, pretrain_in_process, run_script, tiny_args
from test_packing import DOCS, EOD, write_dataset


@pytest.mark.timeout(300)
def test_load_without_checkpoint_and_damaged_checkpoint_files(vl_data, tmp_path, monkeypatch, capsys):
    """Item 5: --load of an existing directory without 'latest' (not --save) is an error.
    Item 9: a missing model file or a garbage .pt is named before DeepSpeed meets it.
    In-process through the entry script's own exit_code (a process each cost 8 s of imports)."""

    def run(*extra, iters=4):
        return pretrain_in_process(tiny_args(vl_data, *extra, iters=iters), monkeypatch, capsys)

    empty = tmp_path / "typo"
    empty.mkdir()
    code, out = run("--load", empty, "--save", tmp_path / "s")
    assert code == 1 and f"error: --load {empty}: no checkpoint there ('latest' missing, and it is not --save" in out
    assert not os.path.exists(tmp_path / "s" / "latest")
    ckpt = tmp_path / "ckpt"
    assert run("--save", ckpt, "--save-interval", 2, iters=2)[0] == 0
    tag = ckpt / "iter_0000002"
    model = tag / "mp_rank_00_model_states.pt"
    for damage in ("missing", "garbage"):
        broken = tmp_path / f"broken-{damage}"
        shutil.copytree(ckpt, broken)
        target = broken / "iter_0000002" / "mp_rank_00_model_states.pt"
        if damage == "missing":
            os.remove(target)
        else:
            target.write_bytes(b"\x00 not a checkpoint " * 10)
        code, out = run("--load", broken, "--save", broken)
        assert code == 1, out[-2000:]
        if damage == "missing":
            assert f"{broken}/iter_0000002: incomplete checkpoint: mp_rank_00_model_states.pt is missing" in out
        else:
            assert f"error: {target}: unreadable checkpoint file (190 bytes, not a torch.save archive" in out
    assert model.exists()


def test_bf16_loss_weights_are_fp32():
    """Item 11: 3 targets: 1/3 in bf16 is 0.33398, so bf16 weights sum to 1.002."""
    from megatron_vl.config import ModelConfig
    from megatron_vl.model.vlgpt import VLGPTHead
    from megatron_vl.parallel.state import ParallelState
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, vocab_size=50, visual_embed_dim=8, make_vocab_size_divisible_by=1)
    head = VLGPTHead(cfg, ParallelState.single()).to(torch.bfloat16)
    hidden = torch.randn(1, 6, 32, dtype=torch.bfloat16)
    labels = torch.tensor([[3, -100, 7, -100, 11, -100]])
    loss = head.loss(hidden, labels, torch.zeros(1, 6, 8), torch.zeros(1, 6, dtype=torch.bool))
    logits = head.lm.logits(hidden).float()
    expect = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100)
    assert abs(loss.lm.item() - expect.item()) <= 2e-4 * expect.item()


def test_targets_across_documents_are_masked(tmp_path):
    """Item 12: with document isolation a position never targets the next document; with
    --eod-mask-loss the target of an end-of-document token gets no loss."""
    docs = [(toks + [EOD], spans) for toks, spans in DOCS]
    prefix = write_dataset(tmp_path / "hand", docs)
    base = dict(seq_length=9, num_image_tokens=2, max_images=5, seed=3, embed_dim=3)
    plain = PackedDataset(prefix, PackingConfig(**base), num_samples=6, cache_dir=str(tmp_path))
    isolated = PackedDataset(prefix, PackingConfig(**base, reset_attention_mask=True), num_samples=6,
                             cache_dir=str(tmp_path))
    eod = PackedDataset(prefix, PackingConfig(**base, eod_mask_loss=True), num_samples=6, cache_dir=str(tmp_path))
    crossings = 0
    for j in range(len(plain.starts) - 1):
        a, b, c = plain.sample_in_order(j), isolated.sample_in_order(j), eod.sample_in_order(j)
        seg, n = a["segment_ids"], a["num_positions"]
        for t in range(n - 1):
            if seg[t] != seg[t + 1]:
                crossings += 1
                assert a["labels"][t] != IGNORE and b["labels"][t] == IGNORE
            else:
                assert a["labels"][t] == b["labels"][t]
        tokens = a["tokens"]
        for t in range(n):
            is_eod = tokens[t] == EOD and not a["visual_mask"][t]
            assert c["labels"][t] == (IGNORE if is_eod else a["labels"][t])
    assert crossings >= 2


def test_prepend_bos(tmp_path):
    from data_helpers import run_tool
    from megatron_vl.data.indexed import IndexedDataset
    sample = tmp_path / "s"
    run_tool("tools/make_sample_data.py", "--output", str(sample), "--documents", "3", "--pairs", "2")
    common = ["tools/preprocess_data.py", "--input-format", "jsonl-text", "--input", str(sample / "text.jsonl"),
              "--tokenizer-model", str(sample / "tokenizer.model"), "--no-progress"]
    run_tool(*common, "--output-prefix", str(tmp_path / "plain"))
    run_tool(*common, "--output-prefix", str(tmp_path / "bos"), "--prepend-bos")
    plain, bos = IndexedDataset(f"{tmp_path}/plain_text_document"), IndexedDataset(f"{tmp_path}/bos_text_document")
    for d in range(plain.num_documents):
        assert list(bos[d]) == [1] + list(plain[d])


def test_document_isolation_is_the_default_and_examples_use_it():
    """Item 13, and item 10: the SLURM recipe signals the tasks (srun starts python itself,
    --signal without B:), and the README says what SIGTERM to torchrun does."""
    cfg, _ = load_config([])
    assert cfg.data.reset_attention_mask is True and cfg.data.eod_mask_loss is False
    assert load_config(["--no-reset-attention-mask"])[0].data.reset_attention_mask is False
    for script in ("examples/pretrain_vlgpt_7b.sh", "examples/slurm/pretrain_vlgpt_7b.sbatch",
                   "examples/pretrain_vlgpt_tp_pp.sh", "examples/quickstart.sh"):
        assert "--reset-attention-mask" in open(os.path.join(ROOT, script)).read(), script
    for script in ("examples/preprocess_mmc4.sh", "examples/preprocess_obelics.sh", "examples/quickstart.sh"):
        assert "--prepend-bos" in open(os.path.join(ROOT, script)).read(), script
    sbatch = open(os.path.join(ROOT, "examples/slurm/pretrain_vlgpt_7b.sbatch")).read()
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", sbatch, re.M)
    srun = [line for line in sbatch.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and re.search(r" python pretrain_vlgpt\.py ", srun[0]) and "torchrun" not in srun[0]
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "SIGTERM to the torchrun launcher" in readme


@pytest.mark.timeout(240)
def test_training_step_reads_the_device_once_per_log_interval(vl_data, tmp_path, monkeypatch):
    """Item 14: losses and the non-finite flag stay on the device; our code reads them (and
    all-reduces them) once per --log-interval, plus the one stop-signal check per step."""
    from megatron_vl.training import pretrain as pt
    counts = {"sync": 0}
    ours = os.path.dirname(pt.__file__)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **kw):
            import sys
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                counts["sync"] += 1
                where = f"{os.path.basename(caller)}:{sys._getframe(1).f_lineno}"
                counts[where] = counts.get(where, 0) + 1
            return original(self, *a, **kw)
        return wrapper

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    steps, interval = 8, 4
    argv = tiny_args(vl_data, "--global-batch-size", 4, "--log-interval", interval, "--zero-stage", 1, iters=steps)
    from megatron_vl.testing.distributed import one_rank_job
    trainer = one_rank_job(lambda: pt.pretrain(argv), monkeypatch.setenv)
    assert trainer.exit_code == 0 and len(trainer.history) == steps
    # 2 micro-batches per step: the landed loop read the device 3 times per micro-batch (and
    # once more per step). Now: 1 per step (the stop-signal agreement), 3 per log window
    # (losses, non-finite flags, gradient norms, each one read), 1 for the final evaluation.
    assert counts["sync"] == steps + 3 * (steps // interval) + 1, counts
    assert counts["engine.py:" + str(_line_of("losses.tolist(), bad.tolist()"))] == 2 * (steps // interval)


def _line_of(text):
    from megatron_vl.training import engine
    with open(engine.__file__) as fh:
        return next(i for i, line in enumerate(fh, 1) if text in line)


def test_fused_kernels_require_is_refused_on_cpu(vl_data, monkeypatch, capsys):
    """Item 15: require fails at start, naming why; auto logs once what each op ran."""
    out = run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, "--fused-kernels", "require")], expect=2)
    assert "error: --fused-kernels require: the fused kernels run on CUDA only" in out
    code, out = pretrain_in_process(tiny_args(vl_data, iters=2), monkeypatch, capsys)
    assert code == 0, out[-2000:]
    assert out.count("kernels (--fused-kernels auto): ") == 1
    assert "attention=torch sdpa, cross_entropy=chunked LM-head loss (torch), rms_norm=torch, rope=torch, " \
           "swiglu=torch" in out
    assert sorted(logged_losses(out)) == [1, 2]


@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_generate_runs_on_cuda(vl_data, tmp_path):
    """Item 16: every tensor generate() makes lives on the model's device."""
    from megatron_vl.inference.modeling_vlgpt import VLGPTForCausalLM
    ckpt, export = tmp_path / "ckpt", tmp_path / "hf"
    run_script([PY, "pretrain_vlgpt.py", *tiny_args(vl_data, "--save", ckpt, iters=2)])
    run_script([PY, "tools/convert_checkpoint.py", "export-hf", "--load", ckpt, "--save", export])
    model = VLGPTForCausalLM.from_pretrained(str(export)).float().cuda()
    ids = torch.tensor([[1, 5, 7, model.image_token_ids["[IMG]"]]], device="cuda")
    # The prompt's open image is completed (N embeddings and [/IMG]), then 12 text tokens, no new image.
    out = model.generate(ids, max_new_tokens=12, max_new_images=0)
    assert out.tokens.device.type == "cuda" and out.tokens.shape[1] == ids.shape[1] + NUM_IMAGE_TOKENS + 1 + 12
    cpu = VLGPTForCausalLM.from_pretrained(str(export)).float().generate(ids.cpu(), max_new_tokens=12,
                                                                         max_new_images=0)
    assert torch.equal(out.tokens.cpu(), cpu.tokens)


def test_a_stale_extension_build_lock_is_named(tmp_path, monkeypatch):
    """A JIT build killed half-way leaves a lock every later run would wait on silently: one
    that no process works beside is named after a short watch, however young
    (tests/test_faults_checkpoints.py covers a live build's lock)."""
    from megatron_vl.training.preflight import stale_build_locks
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert stale_build_locks(grace_seconds=0.2) == []     # no lock: no wait
    (tmp_path / "deepspeed_shm_comm").mkdir()
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.write_text("")
    assert stale_build_locks(grace_seconds=0.2) == [str(lock)]
