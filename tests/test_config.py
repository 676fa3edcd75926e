import json

import pytest

from megatron_vl.config import Config, ConfigError, build_parser, deepspeed_config, load_config, save_yaml


def test_megatron_flag_names_exist_and_parse():
    flags = ["--num-layers", "4", "--hidden-size", "128", "--ffn-hidden-size", "352",
             "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "512",
             "--max-position-embeddings", "1024", "--vocab-size", "32000", "--rotary-base", "500000",
             "--norm-epsilon", "1e-6", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
             "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "3e-4", "--min-lr", "3e-5",
             "--lr-warmup-iters", "10", "--train-iters", "50", "--weight-decay", "0.1", "--clip-grad", "0.5",
             "--bf16", "--seed", "7", "--save", "ck", "--load", "ck0", "--save-interval", "5",
             "--data-path", "0.5", "a", "0.5", "b", "--tokenizer-model", "tok.model"]
    cfg, _ = load_config(flags)
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 128 and cfg.model.ffn_hidden_size == 352
    assert cfg.model.num_attention_heads == 8 and cfg.model.num_query_groups == 2
    assert cfg.model.max_position_embeddings == 1024 and cfg.model.vocab_size == 32000
    assert cfg.model.rotary_base == 500000.0 and cfg.model.norm_epsilon == 1e-6
    assert cfg.parallel.tensor_model_parallel_size == 2 and cfg.parallel.pipeline_model_parallel_size == 2
    assert cfg.training.micro_batch_size == 2 and cfg.training.global_batch_size == 16
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.min_lr == 3e-5 and cfg.optimizer.lr_warmup_iters == 10
    assert cfg.training.train_iters == 50 and cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.clip_grad == 0.5
    assert cfg.training.bf16 is True and cfg.training.seed == 7
    assert (cfg.checkpoint.save, cfg.checkpoint.load, cfg.checkpoint.save_interval) == ("ck", "ck0", 5)
    assert cfg.data.data_path == ["0.5", "a", "0.5", "b"] and cfg.data.tokenizer_model == "tok.model"


def test_every_field_has_help_and_help_runs(capsys):
    import dataclasses
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"
    with pytest.raises(SystemExit) as exc:
        build_parser("test").parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--num-query-groups" in out and "grouped-query attention" in out


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 6\n  hidden_size: 96\ntraining:\n  micro_batch_size: 3\n  bf16: true\n")
    cfg, _ = load_config(["--config", str(path), "--num-layers", "8", "--no-bf16"])
    assert cfg.model.num_layers == 8          # flag beats YAML
    assert cfg.model.hidden_size == 96        # YAML beats default
    assert cfg.training.micro_batch_size == 3
    assert cfg.training.bf16 is False
    # A saved config loads back to the same values.
    out = tmp_path / "resolved.yaml"
    save_yaml(cfg, str(out))
    again, _ = load_config(["--config", str(out)])
    assert again == cfg


def test_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layerz: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key model\.num_layerz"):
        load_config(["--config", str(bad)])
    bad.write_text("modle:\n  num_layers: 2\n")
    with pytest.raises(ConfigError, match="unknown section 'modle'"):
        load_config(["--config", str(bad)])
    bad.write_text("model:\n  num_layers: two\n")
    with pytest.raises(ConfigError, match="model.num_layers: expected int, got 'two'"):
        load_config(["--config", str(bad)])


@pytest.mark.parametrize("flags, world, message", [
    (["--num-attention-heads", "6", "--hidden-size", "96", "--tensor-model-parallel-size", "4"], 4,
     r"--num-attention-heads \(6\) must be divisible by --tensor-model-parallel-size \(4\)"),
    (["--num-attention-heads", "4", "--num-query-groups", "1", "--tensor-model-parallel-size", "2"], 2,
     r"--num-query-groups \(1\) must be divisible by --tensor-model-parallel-size \(2\)"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2,
     r"--num-layers \(3\) must be divisible by --pipeline-model-parallel-size \(2\)"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2,
     r"--global-batch-size \(6\) must equal --micro-batch-size \(2\) x gradient accumulation steps x "
     r"data-parallel size \(2\)"),
    (["--zero-stage", "3", "--pipeline-model-parallel-size", "2"], 2,
     r"DeepSpeed cannot combine ZeRO-2/3 with pipeline parallelism.*Use --zero-stage 1"),
    (["--tensor-model-parallel-size", "2"], 3, r"world size 3 is not divisible"),
])
def test_validation_messages(flags, world, message):
    cfg, _ = load_config(flags)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(world)


def test_zero3_with_pipeline_refused_before_any_distributed_work():
    import torch.distributed as dist
    cfg, _ = load_config(["--zero-stage", "2", "--pipeline-model-parallel-size", "2"])
    with pytest.raises(ConfigError, match="ZeRO-2/3"):
        deepspeed_config(cfg, world_size=4)
    assert not dist.is_initialized()


def test_deepspeed_json_is_derived():
    cfg, _ = load_config(["--micro-batch-size", "2", "--global-batch-size", "16", "--tensor-model-parallel-size", "2",
                          "--zero-stage", "3", "--clip-grad", "0", "--bf16"])
    ds = deepspeed_config(cfg, world_size=4)   # dp = 2 -> 4 accumulation steps
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.0      # written explicitly: DeepSpeed's default would clip at 1.0
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    cfg, _ = load_config(["--pipeline-model-parallel-size", "2", "--zero-stage", "0", "--bf16"])
    assert deepspeed_config(cfg, world_size=2)["zero_optimization"] == {"stage": 1}   # pipelines run ZeRO-1


def test_user_deepspeed_json_merges_and_conflicts_name_both_values(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization":
                                {"stage": 3, "overlap_comm": True}, "flops_profiler": {"enabled": False}}))
    cfg, _ = load_config(["--zero-stage", "3", "--micro-batch-size", "4", "--deepspeed_config", str(user)])
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["flops_profiler"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == 4
    user.write_text(json.dumps({"train_batch_size": 64}))
    cfg, _ = load_config(["--micro-batch-size", "4", "--deepspeed_config", str(user)])
    with pytest.raises(ConfigError, match=r"ds\.json: train_batch_size = 64 conflicts with the value derived "
                                          r"from the flags \(4\)"):
        deepspeed_config(cfg, world_size=1)
    user.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg, _ = load_config(["--zero-stage", "1", "--deepspeed_config", str(user)])
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage = 2 conflicts .* \(1\)"):
        deepspeed_config(cfg, world_size=1)


def test_padded_vocab():
    cfg, _ = load_config(["--vocab-size", "32003"])
    assert cfg.model.padded_vocab_size(1) == 32128
    assert cfg.model.padded_vocab_size(2) == 32256
    assert cfg.model.padded_vocab_size(8) == 32768  # 1024 x 32


def test_distributed_timeout_minutes_reaches_the_process_group(monkeypatch):
    """Megatron's --distributed-timeout-minutes: the process group's collective timeout."""
    import datetime
    import torch.distributed as dist
    from megatron_vl.parallel import state
    from megatron_vl.parallel.launcher import detect_launch
    cfg, _ = load_config(["--distributed-timeout-minutes", "45"])
    assert cfg.parallel.distributed_timeout_minutes == 45
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    import os
    saved = dict(os.environ)   # init_distributed exports RANK etc. for DeepSpeed: put them back after
    try:
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
        state.init_distributed("gloo", single_process_group=True, launch=detect_launch(),
                               timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert seen["timeout"] == datetime.timedelta(minutes=45)
