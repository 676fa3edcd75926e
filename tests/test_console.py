"""What a user reads on the console: no warning from our own code and no third-party note that
reads as trouble (torchvision fallback, diffusers' float32 cast) on a short run; a --load,
--data-path or stage-1 model directory that does not exist is one line within seconds, before
any model or DeepSpeed set-up; a CLIP scoring directory without its projection is refused."""

import contextlib
import logging
import os
import sys
import time
import warnings

import pytest

from megatron_vl.testing import processes
from pretrain_helpers import ROOT, pretrain_in_process, script_env, tiny_args
from test_faults_config_data import write_prefix

OURS = (os.path.join(ROOT, "megatron_vl") + os.sep, os.path.join(ROOT, "tools") + os.sep)
NOISE = ("requires torchvision (not installed); falling back to", "should be kept in float32",
         "image_encoder is not loaded since", "LOAD REPORT")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def console_capture():
    """(warnings, log messages) of transformers, diffusers and DeepSpeed while the block runs."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("transformers", "diffusers", "DeepSpeed", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught, handler.messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def _ours(caught):
    return [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if os.path.abspath(w.filename).startswith(OURS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_prefix(tmp_path_factory.mktemp("console") / "d")


@pytest.mark.timeout(120)
def test_a_short_run_prints_no_warning_of_ours(data, tmp_path, monkeypatch, capsys):
    from megatron_vl.model.image_tokenizer import load_image_processor
    from megatron_vl.inference.diffusion_decoder import DiffusionDecoder
    from megatron_vl.stage1.evaluation import ClipImageScorer
    from megatron_vl.model.detokenizer_targets import condition_shapes
    from megatron_vl.model.image_detokenizer import ImageDetokenizer, ImageDetokenizerConfig
    from megatron_vl.testing.tiny_models import save_tiny_clip, save_tiny_ip_adapter, save_tiny_sd
    with console_capture() as (caught, logged):
        code, out = pretrain_in_process(tiny_args(data, "--seq-length", 64, "--save", tmp_path / "ckpt", iters=2),
                                        monkeypatch, capsys)
        assert code == 0, out[-2000:]
        clip = save_tiny_clip(str(tmp_path / "clip"))
        processor = load_image_processor(clip)
        save_tiny_sd(str(tmp_path / "sd"))
        save_tiny_ip_adapter(str(tmp_path / "ip"), str(tmp_path / "sd"), "ip.safetensors")
        ClipImageScorer(str(tmp_path / "ip" / "image_encoder"))
        shapes = condition_shapes(str(tmp_path / "ip" / "image_encoder"), str(tmp_path / "sd"))
        DiffusionDecoder(ImageDetokenizer(ImageDetokenizerConfig(
            32, *shapes, width=32, num_layers=1, num_heads=2, sd_dir=str(tmp_path / "sd"),
            ip_adapter_dir=str(tmp_path / "ip"), ip_adapter_weight="ip.safetensors")))
    assert _ours(caught) == []
    noisy = [m for m in logged if any(n in m for n in NOISE)]
    noisy += [line for line in capsys.readouterr().err.splitlines() if any(n in line for n in NOISE)]
    assert noisy == []
    assert "torchvision" not in out and "Warning" not in out, out[-2000:]
    try:   # transformers >= 5: the PIL class by name (the plain name is the torchvision backend)
        from transformers import CLIPImageProcessorPil
        assert isinstance(processor, CLIPImageProcessorPil)
    except ImportError:
        pass


def test_torchvision_fallback_note_is_dropped_in_a_fresh_interpreter():
    """transformers notes each fallback once per process: in this test process an earlier import
    may have used it up, so a fresh interpreter imports diffusers (whose loaders import both
    CLIPImageProcessor and SiglipImageProcessor) after our package, as every entry point does."""
    code = ("import megatron_vl.model.image_tokenizer, diffusers\n"
            "from diffusers import StableDiffusionPipeline\n"
            "import transformers\n"
            "transformers.SiglipImageProcessor, transformers.CLIPImageProcessor\n"
            "print('imported')")
    proc = processes.run_script([sys.executable, "-c", code], cwd=ROOT, timeout=120, env=script_env())
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-2000:]
    assert "falling back to" not in proc.stderr and "torchvision" not in proc.stderr, proc.stderr[-2000:]


def _timed(job):
    start = time.monotonic()
    code, out = job()
    return code, out, time.monotonic() - start


@pytest.mark.timeout(120)
def readme_exit_code(row_start: str) -> int:
    """The exit code the README's bad-input table gives for the row starting with `row_start`."""
    import re
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as fh:
        row = next(line for line in fh if line.startswith("| " + row_start))
    return int(re.search(r"exit (\d)", row).group(1))


def test_missing_inputs_are_named_before_anything_is_built(data, tmp_path, monkeypatch, capsys):
    """--load that is not there, a directory with no 'latest', --ckpt-step of an absent tag,
    a missing --data-path prefix, and stage 1's missing model directories and shards: one
    line, exit 1, within seconds (before the model and DeepSpeed: that took ~25 s)."""
    empty = tmp_path / "typo"
    empty.mkdir()
    cases = [(["--load", tmp_path / "nope"], f"error: --load {tmp_path / 'nope'}: no such directory"),
             (["--load", empty, "--save", tmp_path / "s"],
              f"error: --load {empty}: no checkpoint there ('latest' missing, and it is not --save"),
             (["--data-path", tmp_path / "nodata"], f"error: {tmp_path / 'nodata'}: no dataset there")]
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000002").mkdir(parents=True)
    (ckpt / "latest").write_text("iter_0000002")
    cases.append((["--load", ckpt, "--ckpt-step", 5],
                  f"error: {ckpt}: checkpoint iter_0000005 does not exist (--ckpt-step names it; there: iter_0000002)"))
    for extra, message in cases:
        argv = tiny_args(data, "--seq-length", 64, iters=2)
        if extra[0] == "--data-path":
            argv[1] = extra[1]
        else:
            argv += [str(a) for a in extra]
        code, out, seconds = _timed(lambda: pretrain_in_process(argv, monkeypatch, capsys))
        assert code == 1 and message in out, out[-2000:]
        # ... and the code is the one the README's table promises for it.
        assert code == readme_exit_code("missing prefix or meta.json" if extra[0] == "--data-path"
                                        else "`--load` that does not exist")
        assert seconds < 5, f"{extra}: {seconds:.1f} s to the error"
        assert "VL-GPT: world" not in out and "Traceback" not in out   # nothing was built
        assert not os.path.exists(tmp_path / "s" / "latest")
    # Stage 3: a missing prefix is exit 1 too (it was a configuration error, exit 2).
    from megatron_vl.testing.distributed import one_rank_job
    from megatron_vl.training.engine import exit_code
    from megatron_vl.training.finetune import DEFAULTS, STAGE, prepare
    from megatron_vl.training.pretrain import pretrain

    def finetune():
        capsys.readouterr()
        argv = DEFAULTS + [str(a) for a in tiny_args(tmp_path / "nodata", "--allow-random-init", iters=2)]
        code = one_rank_job(lambda: exit_code(lambda: pretrain(argv, "stage 3", STAGE, prepare)), monkeypatch.setenv)
        captured = capsys.readouterr()
        return code, captured.out + captured.err
    code, out, seconds = _timed(finetune)
    assert code == 1 and f"error: {tmp_path / 'nodata'}: no dataset there" in out and seconds < 5, out[-2000:]
    # Stage 1: the model directories and shards, before CLIP, SD or DeepSpeed load.
    from megatron_vl.stage1.trainer import train_tokenizer
    shards = tmp_path / "pairs"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    (tmp_path / "ip.safetensors").write_bytes(b"")
    base = ["--ip-adapter-weight", "ip.safetensors", "--visual-embed-dim", 32, "--num-image-tokens", 8,
            "--tokenizer-heads", 2, "--detokenizer-width", 32, "--detokenizer-heads", 2, "--detokenizer-layers", 1,
            "--micro-batch-size", 2, "--train-iters", 2]
    for dirs, shard, message in [
            ((tmp_path / "no-clip", tmp_path, tmp_path / "no-ip"), shards / "00000.tar",
             f"error: --clip-model {tmp_path / 'no-clip'}: no such directory; --ip-adapter {tmp_path / 'no-ip'}: "
             "no such directory"),
            ((tmp_path, tmp_path, tmp_path), shards / "{00000..00001}.tar",
             f"error: --train-shards: 1 shard(s) do not exist: {shards / '00001.tar'}")]:
        argv = [str(a) for a in ["--clip-model", dirs[0], "--sd-model", dirs[1], "--ip-adapter", dirs[2],
                                 "--train-shards", shard, *base]]

        def stage1():
            capsys.readouterr()
            code = one_rank_job(lambda: exit_code(lambda: train_tokenizer(argv)), monkeypatch.setenv)
            captured = capsys.readouterr()
            return code, captured.out + captured.err
        code, out, seconds = _timed(stage1)
        assert code == 1 and message in out and seconds < 5, out[-2000:]
        assert "stage 1: world" not in out


def test_clip_scorer_without_projection_is_refused(tmp_path, capsys):
    """A CLIPVisionModel directory (no visual projection) would score through a random one."""
    from megatron_vl.model.directory import PartDirectoryError
    from megatron_vl.stage1.evaluation import ClipImageScorer
    from megatron_vl.testing.tiny_models import save_tiny_clip
    clip = save_tiny_clip(str(tmp_path / "clip"))
    capsys.readouterr()
    with pytest.raises(PartDirectoryError) as info:
        ClipImageScorer(clip)
    message = str(info.value)
    assert message.startswith(f"{clip}: the CLIP scoring model (--clip-score-model) lacks weights: "
                              "visual_projection.weight (not in the directory's weight files")
    assert "CLIPVisionModelWithProjection" in message
    err = capsys.readouterr().err
    assert "newly initialized" not in err and "LOAD REPORT" not in err
