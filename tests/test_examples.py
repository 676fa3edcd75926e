"""Every example script parses (bash -n) and, run with the launchers and python replaced by
recorders, hands each Python entry point only flags its parser accepts; pretraining
commands also pass the config check (layout, batch arithmetic, DeepSpeed JSON merge) at
the world size their launcher gives. Launcher flags go through the real deepspeed and
torchrun parsers. The sbatch script requeues a run that stopped early and not a finished one."""

import glob
import importlib.util
import json
import os
import re
import sys

import pytest

from megatron_vl.config import ConfigError, deepspeed_config, load_config
from megatron_vl.testing import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.sh"), recursive=True) +
                 glob.glob(os.path.join(ROOT, "examples", "**", "*.sbatch"), recursive=True))
RECORDED = ["deepspeed", "torchrun", "srun", "mpirun", "python", "python3", "scontrol"]
STUB = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["RECORD"], "a") as fh:
    fh.write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:]]) + "\\n")
"""


def run_recorded(script, tmp_path, args=(), **env):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in RECORDED:
        (bindir / name).write_text(STUB)
        (bindir / name).chmod(0o755)
    record = tmp_path / "calls.jsonl"
    record.write_text("")
    full_env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", RECORD=str(record), **env)
    proc = processes.run_script(["bash", script, *args], cwd=ROOT, env=full_env, timeout=120)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return [tuple(json.loads(line)) for line in record.read_text().splitlines()]


def entry_points(calls):
    """(launcher, world size or None, script, argv) for every Python entry point started."""
    out = []
    for tool, args in calls:
        world = None
        if tool in ("python", "python3"):
            while args and args[0] in ("-u", "-O"):
                args = args[1:]
            if args[:2] == ["-m", "torch.distributed.run"]:
                tool, args = "torchrun", args[2:]
            elif args[:1] == ["-m"] or args[:1] == ["-"]:
                continue          # pip, inline code
        if tool == "deepspeed":
            from deepspeed.launcher.runner import parse_args
            ds = parse_args(args)
            # no --num_nodes and no hostfile: this machine alone
            world = max(ds.num_nodes, 1) * ds.num_gpus if ds.num_gpus > 0 else None
            script, argv = ds.user_script, ds.user_args
        elif tool == "torchrun":
            from torch.distributed.run import get_args_parser
            tr = get_args_parser().parse_args(args)
            world = int(tr.nnodes.split(":")[-1]) * int(tr.nproc_per_node)
            script, argv = tr.training_script, tr.training_script_args
        elif tool in ("srun", "mpirun"):
            py = next(i for i, a in enumerate(args) if os.path.basename(a) in ("python", "python3"))
            script, argv = args[py + 1], args[py + 2:]
        elif tool in ("python", "python3"):
            script, argv = args[0], args[1:]
        else:
            continue
        out.append((tool, world, script, argv))
    return out


def check_entry_point(script, argv, world):
    spec = importlib.util.spec_from_file_location("entry_" + re.sub(r"\W", "_", script), os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.build_parser()
    parser.exit_on_error = False
    try:
        parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{script} rejects {argv}")
    if os.path.basename(script) == "train_tokenizer.py":
        from megatron_vl.stage1.config import TokenizerTrainConfig
        cfg, _ = load_config(argv, parser=module.build_parser(), config_cls=TokenizerTrainConfig)
        try:
            return deepspeed_config(cfg, world)
        except ConfigError as exc:
            pytest.fail(f"{script} at world size {world}: {exc}")
    if os.path.basename(script) == "finetune_instruct.py":   # it runs with its defaults before the flags
        from megatron_vl.training.finetune import DEFAULTS
        argv = DEFAULTS + list(argv)
    if os.path.basename(script) in ("pretrain_vlgpt.py", "finetune_instruct.py"):
        cfg, _ = load_config(argv, parser=module.build_parser())
        try:
            return deepspeed_config(cfg, world)
        except ConfigError as exc:
            pytest.fail(f"{script} at world size {world}: {exc}")
    return None


def test_every_script_passes_bash_n():
    assert len(SCRIPTS) >= 6
    for script in SCRIPTS:
        proc = processes.run_script(["bash", "-n", script], timeout=None)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def _hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# 4 nodes of 8 GPUs\n" + "".join(f"dgx{i:02d} slots=8\n" for i in range(1, 5)))
    return str(path)


def test_7b_deepspeed_script(tmp_path):
    calls = run_recorded(os.path.join(ROOT, "examples/pretrain_vlgpt_7b.sh"), tmp_path, HOSTFILE=_hostfile(tmp_path))
    (launcher, world, script, argv), = entry_points(calls)
    assert (launcher, world, script) == ("deepspeed", 32, "pretrain_vlgpt.py")
    assert calls[0][1][calls[0][1].index("--master_addr") + 1] == "dgx01"   # first host of the hostfile
    ds = check_entry_point(script, argv, world)
    cfg, _ = load_config(argv)
    # The paper's stage-2 run: LLaMA-7B + LoRA, 512 tokens, batch 4096, 20k steps, lr 2e-4 cosine, bf16, ZeRO-3.
    m, t, o = cfg.model, cfg.training, cfg.optimizer
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (32, 4096, 11008, 32)
    assert (m.seq_length, t.global_batch_size, t.train_iters, o.lr, o.lr_decay_style, t.bf16) == \
        (512, 4096, 20000, 2e-4, "cosine", True)
    assert cfg.lora.lora_rank > 0
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4096
    assert ds["zero_optimization"]["overlap_comm"] is True     # from the template


def test_tp_pp_script(tmp_path):
    calls = run_recorded(os.path.join(ROOT, "examples/pretrain_vlgpt_tp_pp.sh"), tmp_path, HOSTFILE=_hostfile(tmp_path))
    (launcher, world, script, argv), = entry_points(calls)
    ds = check_entry_point(script, argv, world)
    cfg, _ = load_config(argv)
    p = cfg.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, world) == (2, 4, 32)
    assert ds["zero_optimization"]["stage"] == 1 and ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["train_batch_size"] == 4096


def _sbatch_world(path):
    header = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", open(path).read(), re.M))
    assert header["signal"] == "USR1@120"
    assert "requeue" in open(path).read()
    return int(header["nodes"]) * int(header["ntasks-per-node"])


def test_sbatch_script_and_requeue(tmp_path):
    path = os.path.join(ROOT, "examples/slurm/pretrain_vlgpt_7b.sbatch")
    world = _sbatch_world(path)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = dict(SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_ID="4242", CKPT_DIR=str(ckpt))
    (ckpt / "latest").write_text("iter_0007500")      # stopped by the signal before the end
    calls = run_recorded(path, tmp_path, **env)
    (launcher, _, script, argv), = entry_points(calls)
    assert launcher == "srun" and world == 32
    ds = check_entry_point(script, argv, world)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4096
    assert ("scontrol", ["requeue", "4242"]) in calls
    (ckpt / "latest").write_text("iter_0020000")      # finished: no requeue
    assert not [c for c in run_recorded(path, tmp_path, **env) if c[0] == "scontrol"]


@pytest.mark.parametrize("name", ["preprocess_mmc4.sh", "preprocess_obelics.sh"])
def test_preprocess_scripts(tmp_path, name):
    calls = run_recorded(os.path.join(ROOT, "examples", name), tmp_path, NUM_NODES="3", OUT=str(tmp_path / "out"))
    points = entry_points(calls)
    assert [os.path.basename(p[2]) for p in points] == ["preprocess_data.py"] * 3 + \
        ["merge_datasets.py", "extract_image_features.py"]
    inputs = []
    for _, _, script, argv in points:
        check_entry_point(script, argv, None)
        if script.endswith("preprocess_data.py"):
            args = argv[argv.index("--input") + 1:]
            inputs.append(args[:next(i for i, a in enumerate(args) if a.startswith("--"))])
    # The three nodes' shard lists partition the whole corpus.
    everything = sorted(sum(inputs, []))
    assert len(everything) == len(set(everything)) == (23099 if "mmc4" in name else 1335)


def test_quickstart_script(tmp_path):
    calls = run_recorded(os.path.join(ROOT, "examples/quickstart.sh"), tmp_path, OUT=str(tmp_path / "qs"))
    points = entry_points(calls)
    names = [os.path.basename(p[2]) for p in points]
    assert names[names.index("train_tokenizer.py"):names.index("train_tokenizer.py") + 3] == [
        "train_tokenizer.py", "export_tokenizer.py", "extract_image_features.py"]
    assert names[-14:] == ["pretrain_vlgpt.py", "convert_checkpoint.py", "generate.py", "generate.py"] + \
        ["preprocess_data.py"] * 4 + [
        "extract_image_features.py", "finetune_instruct.py", "convert_checkpoint.py", "generate.py",
        "reconstruct_images.py", "plot_loss.py"]
    for launcher, world, script, argv in points:
        check_entry_point(script, argv, world)


@pytest.mark.parametrize("template", sorted(glob.glob(os.path.join(ROOT, "examples/ds_configs/*.json"))))
def test_ds_config_templates_pass_the_config_check(template):
    user = json.load(open(template))
    stage = user["zero_optimization"]["stage"]
    argv = ["--zero-stage", str(stage), "--bf16", "--micro-batch-size", "2", "--global-batch-size", "16",
            "--deepspeed_config", template]
    if "pipeline" in os.path.basename(template):
        argv += ["--pipeline-model-parallel-size", "2"]
    cfg, _ = load_config(argv)
    ds = deepspeed_config(cfg, 8)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == stage
    assert "auto" not in json.dumps(ds)
    # and a contradiction between flags and template is refused
    cfg, _ = load_config(argv[2:9] + ["--zero-stage", str({1: 2, 2: 1, 3: 1}[stage])])
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        deepspeed_config(cfg, 8)


@pytest.mark.timeout(300)
def test_ds_config_templates_run_on_a_real_engine(vl_data):
    """Each template, merged with matching flags, drives a real DeepSpeed engine (2 gloo
    processes, bf16, one step): the keys they add are ones DeepSpeed accepts."""
    from megatron_vl.testing.distributed import run_distributed
    from pretrain_helpers import pretrain_runs, tiny_args
    layouts = {"zero3_bf16.json": ["--zero-stage", 3, "--lora-rank", 4], "zero2_bf16.json": ["--zero-stage", 2],
               "zero1_bf16_pipeline.json": ["--zero-stage", 1, "--pipeline-model-parallel-size", 2]}
    assert sorted(layouts) == sorted(os.path.basename(t) for t in glob.glob(os.path.join(ROOT, "examples/ds_configs/*.json")))
    argvs = [[str(a) for a in tiny_args(vl_data, "--global-batch-size", 4, "--bf16", *layout, "--deepspeed_config",
                                        os.path.join(ROOT, "examples/ds_configs", name), iters=1)]
             for name, layout in layouts.items()]
    histories = run_distributed(pretrain_runs, 2, argvs, timeout=280)[-1]
    for name, history in zip(layouts, histories):
        assert len(history) == 1 and history[0]["lm"] > 0, name


def test_train_tokenizer_script_has_the_paper_settings(tmp_path):
    calls = run_recorded(os.path.join(ROOT, "examples/train_tokenizer.sh"), tmp_path)
    points = entry_points(calls)
    (launcher, world, script, argv), export = points
    assert (launcher, world, script) == ("deepspeed", 8, "train_tokenizer.py")
    assert os.path.basename(export[2]) == "export_tokenizer.py"
    check_entry_point(export[2], export[3], None)
    ds = check_entry_point(script, argv, world)
    from megatron_vl.stage1.config import TokenizerTrainConfig
    cfg, _ = load_config(argv, config_cls=TokenizerTrainConfig)
    # VL-GPT stage 1: AdamW lr 2e-4 cosine, global batch 1024, 10k iterations, 8 GPUs; N=32 of d=4096.
    t, o, m = cfg.training, cfg.optimizer, cfg.model
    assert (o.lr, o.lr_decay_style, t.global_batch_size, t.train_iters) == (2e-4, "cosine", 1024, 10000)
    assert (m.num_image_tokens, m.visual_embed_dim, m.lambda_image, m.lambda_text) == (32, 4096, 1.0, 1.0)
    assert ds["train_batch_size"] == 1024 and ds["gradient_accumulation_steps"] == 4
    assert len(cfg.data.train_shards) == 6   # three weighted sources


def test_finetune_instruct_script_has_the_paper_settings(tmp_path):
    calls = run_recorded(os.path.join(ROOT, "examples/finetune_instruct.sh"), tmp_path, DATA=str(tmp_path / "data"))
    points = entry_points(calls)
    names = [os.path.basename(p[2]) for p in points]
    assert names == ["preprocess_data.py"] * 5 + ["extract_image_features.py", "finetune_instruct.py",
                                                   "convert_checkpoint.py"]
    for launcher, world, script, argv in points:
        check_entry_point(script, argv, world)
    launcher, world, script, argv = points[6]
    assert (launcher, world) == ("deepspeed", 4)
    from megatron_vl.training.finetune import DEFAULTS
    cfg, _ = load_config(DEFAULTS + argv)
    # VL-GPT-I: LoRA, lr 5e-5, global batch 512, 10k iterations, 4 GPUs.
    assert (cfg.lora.lora_rank > 0, cfg.optimizer.lr, cfg.training.global_batch_size, cfg.training.train_iters) == \
        (True, 5e-5, 512, 10000)
    assert cfg.data.reset_attention_mask and len(cfg.data.data_path) == 10
