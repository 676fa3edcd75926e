"""Model presets (--model-preset NAME, megatron_vl/config/presets/NAME.yaml, linked as examples/configs): each gives its model's
exact architecture; the layers stack preset < --config YAML < flags; an unknown name is one
line naming the choices; --help lists exactly the files there; the examples use them."""

import glob
import importlib.util
import os
import re

import pytest

from megatron_vl.config import ConfigError, build_parser, given_settings, load_config
from megatron_vl.errors import UsageError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET_FILES = os.path.join(ROOT, "examples", "configs")

# (layers, hidden, ffn, heads, kv heads, vocab, seq, positions, eps, visual d, N)
EXPECTED = {
    "tiny": (2, 64, 176, 4, 2, 258, 512, 512, 1e-5, 64, 32),
    "llama-7b": (32, 4096, 11008, 32, 32, 32000, 2048, 2048, 1e-6, 64, 32),
    "llama-13b": (40, 5120, 13824, 40, 40, 32000, 2048, 2048, 1e-6, 64, 32),
    "vlgpt-7.5b": (32, 4096, 11008, 32, 32, 32002, 512, 2048, 1e-6, 4096, 32),
}


def _architecture(cfg):
    m = cfg.model
    return (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.kv_heads, m.vocab_size,
            m.seq_length, m.max_positions, m.norm_epsilon, m.visual_embed_dim, cfg.data.num_image_tokens)


def _entry(rel):
    spec = importlib.util.spec_from_file_location("entry_" + re.sub(r"\W", "_", rel), os.path.join(ROOT, rel))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _listed_presets(parser):
    """The preset names the --model-preset help text lists."""
    text = re.sub(r"\s+", " ", parser.format_help())
    found = re.search(r"--model-preset NAME\|FILE Model size preset: (.*?) \(config/presets/NAME\.yaml\)", text)
    assert found, "--help does not list the presets"
    return found.group(1).split(", ")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_gives_its_architecture(name):
    cfg, _ = load_config(["--model-preset", name])
    assert _architecture(cfg) == EXPECTED[name]
    assert cfg.model.rotary_base == 10000.0 and cfg.model.untie_embeddings_and_output_weights is True
    cfg.validate(world_size=1)
    # nothing but the architecture: training, parallel, optimizer and LoRA settings stay the defaults
    default, _ = load_config([])
    for section in ("parallel", "optimizer", "training", "checkpoint", "logging", "lora"):
        assert getattr(cfg, section) == getattr(default, section), section


def test_llama_7b_is_the_hf_config():
    m = load_config(["--model-preset", "llama-7b"])[0].model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.vocab_size) == \
        (32, 4096, 11008, 32, 32000)
    assert m.num_query_groups is None and m.max_position_embeddings == 2048 and m.norm_epsilon == 1e-6


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  num_layers: 16\n  vocab_size: 32002\ntraining:\n  micro_batch_size: 3\n")
    for argv in (["--model-preset", "llama-7b", "--config", str(run), "--num-layers", "8"],
                 ["--num-layers", "8", "--config", str(run), "--model-preset", "llama-7b"]):   # order of flags: no matter
        cfg, _ = load_config(argv)
        m = cfg.model
        assert m.num_layers == 8                  # flag beats YAML and preset
        assert m.vocab_size == 32002              # YAML beats preset
        assert m.hidden_size == 4096              # preset beats default (64)
        assert m.seq_length == 2048               # preset, nothing above it
        assert cfg.training.micro_batch_size == 3
    # without the flag the YAML wins over the preset; without both, the preset
    assert load_config(["--model-preset", "llama-7b", "--config", str(run)])[0].model.num_layers == 16
    assert load_config(["--model-preset", "llama-7b"])[0].model.num_layers == 32
    assert load_config(["--model-preset", "llama-7b", "--no-untie-embeddings-and-output-weights"])[0] \
        .model.untie_embeddings_and_output_weights is False


def test_a_preset_may_be_a_file(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  num_layers: 6\n  hidden_size: 96\n  num_attention_heads: 6\n")
    cfg, ns = load_config(["--model-preset", str(mine), "--hidden-size", "192"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (6, 192, 6)
    # the settings it gives count as given (the planner fixes what the user fixed)
    assert {"model.num_layers", "model.hidden_size", "model.num_attention_heads"} <= given_settings(ns)
    assert "model.ffn_hidden_size" not in given_settings(ns)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layerz: 6\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key model\.num_layerz"):
        load_config(["--model-preset", str(bad)])
    with pytest.raises(ConfigError, match=r"^--model-preset .*missing\.yaml: no such file$"):
        load_config(["--model-preset", str(tmp_path / "missing.yaml")])


def test_unknown_preset_is_one_line_naming_the_choices(capsys):
    with pytest.raises(UsageError) as exc:
        load_config(["--model-preset", "llama-8b"])
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("--model-preset llama-8b: no such preset; choose one of "
                              "llama-13b, llama-7b, tiny, vlgpt-7.5b ")
    # through an entry point: that line, exit 2, nothing else printed
    plan = _entry("tools/plan_parallelism.py")
    assert run_cli(plan.main, ["--model-preset", "llama-8b"]) == 2
    out, err = capsys.readouterr()
    assert not out and err == f"error: {message}\n"


def test_help_lists_exactly_the_preset_files():
    files = sorted(os.path.basename(p)[:-len(".yaml")] for p in glob.glob(os.path.join(PRESET_FILES, "*.yaml")))
    assert sorted(os.listdir(PRESET_FILES)) == [f + ".yaml" for f in files]   # nothing else lives there
    assert files == sorted(EXPECTED)
    assert _listed_presets(build_parser("test")) == files
    for rel in ("pretrain_vlgpt.py", "finetune_instruct.py", "tools/make_tiny_llama.py"):
        assert _listed_presets(_entry(rel).build_parser()) == files, rel


def test_planner_help_lists_the_presets(capsys):
    with pytest.raises(SystemExit):
        _entry("tools/plan_parallelism.py").main(["--help"])
    out = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "Model size preset: llama-13b, llama-7b, tiny, vlgpt-7.5b (config/presets/NAME.yaml)" in out


def test_the_tokenizer_stage_has_no_model_preset(capsys):
    """Stage 1's model section is the image tokenizer's, not a language model's: the LM presets
    do not apply, and its parser does not offer the flag."""
    parser = _entry("train_tokenizer.py").build_parser()
    assert "--model-preset" not in parser.format_help()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--model-preset", "tiny"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --model-preset tiny" in capsys.readouterr().err


def test_examples_use_presets_not_architecture_flags():
    scripts = sorted(glob.glob(os.path.join(ROOT, "examples", "**", "*.sh"), recursive=True) +
                     glob.glob(os.path.join(ROOT, "examples", "**", "*.sbatch"), recursive=True))
    using = {}
    for script in scripts:
        text = open(script).read()
        for flag in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads"):
            assert flag not in text, f"{os.path.relpath(script, ROOT)} spells out {flag}: use --model-preset"
        using[os.path.relpath(script, ROOT)] = re.findall(r"--model-preset (\S+)", text)
    assert using["examples/pretrain_vlgpt_7b.sh"] == ["vlgpt-7.5b"]
    assert using["examples/pretrain_vlgpt_tp_pp.sh"] == ["vlgpt-7.5b"]
    assert using["examples/slurm/pretrain_vlgpt_7b.sbatch"] == ["vlgpt-7.5b"]
    assert using["examples/finetune_instruct.sh"] == ["vlgpt-7.5b"]
    assert using["examples/quickstart.sh"] == ["tiny"] * 3
