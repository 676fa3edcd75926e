"""The VL-GPT pretraining loop on a DeepSpeed engine (pretrain_vlgpt.py is its entry point)."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..ops._dispatch import check_required, implementations
from ..atomic import same_path
from ..eval.in_training import check_eval_tasks
from ..config import Config, ConfigError, build_parser, effective_zero_stage, load_config, validate
from .pipeline_stages import pipe_head, pipeline_inputs
from ..parallel.random import seed_everything
from ..parallel.state import ParallelState
from ..checkpoint.layout import write_stage
from .build import build_model, initialize_engine
from .engine import Trainer, exit_code, run_training, start_process
from .data import build_data, loader, model_batch
from .metrics import StepStats, format_line, throughput
from .preflight import guarded_save


@contextlib.contextmanager
def random_state_kept(device: torch.device):
    """The training's random streams (torch's on the CPU and the device, Python's, NumPy's) as
    they were before the block: an evaluation draws from them (its image tokenizer is initialised
    randomly before its weights load; lmms-eval's internals), and the next steps' dropout must
    not see it."""
    state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


class VLGPTTrainer(Trainer):
    """Stage 2: VL-GPT on packed interleaved data (TP, PP, ZeRO)."""

    loss_names = ("lm", "visual")

    def __init__(self, cfg: Config, state: ParallelState, engine, built, data, tracker, device, world: int):
        super().__init__(cfg, engine, device, world, data.global_batch, tracker, state.dp_group, state.dp,
                         # the last stage holds the losses (Megatron's rule)
                         reporting=(dist.get_rank() if dist.is_initialized() else 0) == world - 1)
        self.state, self.built, self.data = state, built, data
        self.pipeline = built.pipeline
        self.head = pipe_head(engine.module) if self.pipeline else None
        t = cfg.training
        self.dtype = t.torch_dtype
        self.kernels_logged = False
        self.evaluator = None        # built at the first --eval-tasks evaluation

    # --- data ---------------------------------------------------------------------------
    def batches(self, consumed: int):
        return self._batches(self.data.train, consumed)

    def _batches(self, dataset, consumed: int, total: Optional[int] = None, digest: bool = True):
        for raw in loader(dataset, self.cfg, consumed, self.state.dp_rank, self.state.dp, total):
            # A fingerprint of what this rank read, so a resumed run can show it read the same.
            if digest:
                self.batch_digest = (self.batch_digest * 1_000_003 + int(raw["image_ids"].sum())
                                     + int((raw["tokens"] * torch.arange(1, raw["tokens"].shape[1] + 1)).sum())) % 2**61
            batch = model_batch(raw, self.cfg, self.device, self.dtype)
            yield pipeline_inputs(batch) if self.pipeline else batch

    # --- pipelined steps ----------------------------------------------------------------
    def _take_reported(self) -> torch.Tensor:
        """(lm, visual) mean over the micro-batches the pipeline head saw since the last call,
        on the device (zeros on stages without the head)."""
        out = torch.zeros(2, device=self.device)
        if self.head is None:
            return out
        reported, self.head.reported = self.head.reported, []
        for r in reported:
            out += torch.stack([r[0].detach().float(), r[1].detach().float()]).to(self.device)
        return out / max(len(reported), 1)

    def pipeline_step(self, batches):
        loss = self.engine.train_batch(data_iter=batches)
        return self._take_reported(), ~torch.isfinite(loss.detach().float().to(self.device)).all()

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> None:
        if self.data.valid is not None:
            self._held_out_loss()
        if self.cfg.training.eval_tasks:
            self._eval_tasks()

    @torch.no_grad()
    def _eval_tasks(self) -> None:
        with random_state_kept(self.device):
            if self.evaluator is None:
                if self.cfg.training.eval_harness == "lmms":
                    from ..eval.lmms.training import LmmsEvaluator as Evaluator
                else:
                    from ..eval.in_training import TrainingEvaluator as Evaluator
                self.evaluator = Evaluator(self.cfg, self.engine, self.device, self.data.tokenizer,
                                           self.data.image_token_ids)
            self.engine.eval()
            results = self.evaluator.run()
            self.engine.train()
        scalars, parts = self.evaluator.logged(results)
        self.log(f"evaluation at iteration {self.iteration} | " + " | ".join(parts))
        self.sinks.scalars(scalars, self.iteration)

    @torch.no_grad()
    def _held_out_loss(self) -> None:
        t = self.cfg.training
        total = t.eval_iters * self.data.global_batch
        batches = self._batches(self.data.valid, 0, total, digest=False)
        acc = torch.zeros(2, device=self.device)
        self.engine.eval()
        for _ in range(t.eval_iters):
            if self.pipeline:
                self.engine.eval_batch(data_iter=batches)
                acc += self._take_reported() / t.eval_iters
            else:
                for _ in range(self.gas):
                    _, lm_part, vis_part = self.engine(next(batches))
                    acc += torch.stack([lm_part.float(), vis_part.float()]) / (self.gas * t.eval_iters)
        self.engine.train()
        acc = acc.double()
        if self.state.dp_group is not None:
            dist.all_reduce(acc, group=self.state.dp_group)
            acc /= self.state.dp
        lm, vis = acc.tolist()
        if self.reporting:
            ppl = math.exp(min(lm, 20.0))
            print(f"validation at iteration {self.iteration} | lm loss: {lm:.8E} | lm PPL: {ppl:.4E} | "
                  f"visual loss: {vis:.8E}", flush=True)
            self.sinks.scalars({"valid/lm_loss": lm, "valid/visual_loss": vis, "valid/lm_ppl": ppl}, self.iteration)

    # --- checkpoints --------------------------------------------------------------------
    def extra_client_state(self) -> Dict:
        # what the HF export needs to place the [IMG]/[/IMG] rows (LoRA row deltas)
        return {"image_token_ids": list(self.data.image_token_ids), "tokenizer": self.data.tokenizer}

    stage = "pretrain"

    def resume(self) -> None:
        if self.built.resharded is not None:
            self._resume_under_new_layout()
        elif not self.built.loaded_from:   # pretrained weights were loaded instead: a fresh run
            super().resume()

    def _resume_under_new_layout(self) -> None:
        """The checkpoint was written under another layout: the weights are in (build_model);
        the optimizer, schedule and counters follow here (training/reshard.py)."""
        from .build import _names, run_layout
        from .reshard import describe, restore_optimizer
        saved = self.built.resharded
        names = _names(self.built.module, self.pipeline, 0, self.cfg.model.num_layers)
        restore_optimizer(self.engine, self.built.module, names, saved, self.cfg, self.state)
        client = saved.weights.client
        self.iteration, self.consumed = int(client["iteration"]), int(client["consumed_train_samples"])
        self.skipped_total = client.get("skipped_total", 0)
        self.skipped_consecutive = client.get("skipped_consecutive", 0)
        self.restore_client_state(client)
        c = self.cfg.checkpoint
        if same_path(c.save, c.load):
            self.saved_iteration = self.iteration
        self.continue_schedule(client)
        now = run_layout(self.cfg, self.state)
        self.log(f"loaded checkpoint {saved.weights.path} (iteration {self.iteration}, {self.consumed} samples "
                 f"consumed) written at {describe(self.built.layout_then)}; this run: {describe(now)}: weights, "
                 "LoRA, visual heads, Adam moments and step, learning-rate schedule and data position carried "
                 "over; RNG streams restart from the seed")

    def write_export(self, tag_dir: str) -> None:
        if self.rank == 0:   # which stage wrote it: finetune_instruct.py resumes its own, starts from others
            write_stage(tag_dir, self.stage)

    def log_window(self, losses, lr, grad_norm, seconds_per_step, loss_scale) -> None:
        stats = StepStats(self.iteration, self.cfg.training.train_iters, self.consumed, losses["lm"],
                          losses["visual"], lr, grad_norm, self.skipped_total, seconds_per_step,
                          self.data.global_batch, loss_scale)
        rates = throughput(stats, self.cfg, self.world)
        if not self.kernels_logged and self.reporting:   # once, after a step really ran them, by the
            self.kernels_logged = True                   # rank that holds the head (every op runs there)
            used = implementations()
            print("kernels (--fused-kernels " + self.cfg.model.fused_kernels + "): "
                  + ", ".join(f"{op}={used[op]}" for op in sorted(used)), flush=True)
        if self.reporting:
            print(format_line(stats, rates), flush=True)
            scalars = {"train/lm_loss": stats.lm_loss, "train/visual_loss": stats.visual_loss, "train/lr": lr,
                       "train/grad_norm": grad_norm or float("nan"), "train/skipped_total": self.skipped_total}
            scalars.update({f"perf/{k}": v for k, v in rates.items()})
            self.sinks.scalars(scalars, self.iteration)


def parser(description: str = "Pretrain VL-GPT on packed interleaved image-text data (DeepSpeed).",
           stage: str = "pretrain"):
    p = build_parser(description)
    if stage == "instruct":
        p.add_argument("--allow-random-init", action="store_true", default=False,
                       help="Instruction-tune randomly initialised weights when no --load is given (normally "
                       "stage 3 tunes a stage-2 checkpoint, and a missing --load is refused).")
    return p


def pretrain(argv: Optional[Sequence[str]] = None, description: Optional[str] = None, stage: str = "pretrain",
             prepare=None) -> VLGPTTrainer:
    """Runs a whole pretraining job (or, with stage="instruct" and its `prepare(cfg, allow_random_init)` check,
    an instruction-tuning one); returns the VLGPTTrainer (exit_code, history)."""
    cfg, ns = load_config(argv, parser=parser(description, stage) if description else parser(stage=stage))
    if prepare is not None:   # the instruction stage's checks; --allow-random-init is its flag
        prepare(cfg, allow_random_init=bool(getattr(ns, "allow_random_init", False)))
    launch, device, owns_group = start_process(cfg, lambda world: validate(cfg, world, extra_checks=[check_eval_tasks]))
    with guarded_save(cfg, stage, launch.rank):
        return _pretrain(cfg, launch, device, owns_group, stage)


def _pretrain(cfg: Config, launch, device, owns_group: bool, stage: str) -> VLGPTTrainer:
    world = launch.world_size
    try:
        check_required(cfg.model.fused_kernels, device.type)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    rank = launch.rank
    p = cfg.parallel
    state = ParallelState.build(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    tracker = seed_everything(cfg.training.seed, state.tp_rank, state.pp_rank, device.type)
    data = build_data(cfg, world)
    built = build_model(cfg, state, tracker, data.image_token_ids, log=print if rank == 0 else (lambda m: None))
    if device.type == "cuda":
        built.module.to(device)
    engine, _ = initialize_engine(cfg, state, built, world)
    trainer = VLGPTTrainer(cfg, state, engine, built, data, tracker, device, world)
    trainer.stage = stage
    trainer.log(f"VL-GPT{' instruction tuning' if stage == 'instruct' else ''}: world {world} = tp {state.tp} x pp {state.pp} x dp {state.dp}, "
                f"ZeRO-{effective_zero_stage(cfg)}, "
                f"{cfg.training.precision}, "
                f"global batch {data.global_batch} (micro {cfg.training.micro_batch_size} x "
                f"accumulation {trainer.gas} x dp {state.dp}); parameters on rank 0: "
                f"{built.counts['trainable']:,} trainable, {built.counts['frozen']:,} frozen")
    return run_training(trainer, owns_group)


def run(argv: Optional[Sequence[str]] = None, description: Optional[str] = None, stage: str = "pretrain",
        prepare=None) -> int:
    """pretrain() with errors reported as one line (configuration: exit 2, checkpoint: 1)."""
    return exit_code(lambda: pretrain(argv, description, stage, prepare))
