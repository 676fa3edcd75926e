"""The VL-GPT pretraining loop on a DeepSpeed engine (pretrain_vlgpt.py is its entry point)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..ops._dispatch import check_required, implementations
from ..config import Config, ConfigError, build_parser, effective_zero_stage, load_config, validate
from ..parallel.pipeline import pipe_head, pipeline_inputs
from ..parallel.random import seed_everything
from ..parallel.launcher import LaunchError, detect_launch
from ..parallel.state import ParallelState, init_distributed
from ..convert.hf import CheckpointError
from . import checkpoint as ckpt
from . import faults
from .build import build_model, initialize_engine
from .data import build_data, loader, model_batch
from .metrics import Sinks, StepStats, format_line, throughput


class TrainingAborted(RuntimeError):
    pass


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's preemption warning): finish the step, save, exit 0."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signum

    def agreed(self, device) -> bool:
        """True on every rank when any rank got a signal (one all-reduce per step)."""
        flag = torch.tensor([1.0 if self.signal is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class Trainer:
    def __init__(self, cfg: Config, state: ParallelState, engine, built, data, tracker, device, world: int):
        self.cfg, self.state, self.engine, self.built, self.data = cfg, state, engine, built, data
        self.tracker, self.device, self.world = tracker, device, world
        self.pipeline = built.pipeline
        self.head = pipe_head(engine.module) if self.pipeline else None
        t = cfg.training
        self.dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else torch.float32
        self.gas = engine.gradient_accumulation_steps()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.reporting = self.rank == world - 1      # the last stage holds the losses (Megatron's rule)
        self.iteration = self.consumed = self.skipped_total = self.skipped_consecutive = 0
        self.exit_code: Optional[int] = None
        self.batch_digest = 0
        self.history: List[Dict] = []    # per iteration, for tests and tools: losses, samples, skips
        self.pending: List[Dict] = []    # step records not yet read off the device (see _settle)
        self.window: List[Dict] = []     # settled records not yet logged
        self.kernels_logged = False
        self.sinks = Sinks(cfg, self.reporting, self.log_all)

    # --- logging ------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def log_all(self, msg: str) -> None:
        print(msg, flush=True)

    # --- data ---------------------------------------------------------------------------
    def _batches(self, dataset, consumed: int, total: Optional[int] = None, digest: bool = True):
        for raw in loader(dataset, self.cfg, consumed, self.state.dp_rank, self.state.dp, total):
            # A fingerprint of what this rank read, so a resumed run can show it read the same.
            if digest:
                self.batch_digest = (self.batch_digest * 1_000_003 + int(raw["image_ids"].sum())
                                     + int((raw["tokens"] * torch.arange(1, raw["tokens"].shape[1] + 1)).sum())) % 2**61
            batch = model_batch(raw, self.cfg, self.device, self.dtype)
            yield pipeline_inputs(batch) if self.pipeline else batch

    # --- one step -----------------------------------------------------------------------
    # Nothing in a step waits for the device: losses and the non-finite flag stay on it and are
    # read once per --log-interval (_settle). The exceptions: ZeRO-0's own skip decision (one
    # all-reduce per step, ZeRO-0 only) and the stop-signal agreement (one per step).
    def _all_finite(self, bad: torch.Tensor) -> bool:
        flag = bad.detach().float().reshape(1).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

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

    def _skip_zero0_update(self) -> None:
        """ZeRO-0 has no overflow check: the step runs (DeepSpeed's counters move, NaN
        gradients are cleared) but the optimizer drops it and the schedule steps back."""
        engine = self.engine
        base = engine.optimizer
        base.skip_next = True
        lrs = [g["lr"] for g in base.param_groups]
        engine.step()
        engine.lr_scheduler.last_epoch -= 1
        for g, lr in zip(base.param_groups, lrs):
            g["lr"] = lr

    def train_step(self, batches) -> Dict:
        """One optimizer step. Returns its record with device tensors (losses, non-finite
        flag); _settle turns records into numbers."""
        engine, step_number = self.engine, self.iteration + 1
        lr = engine.get_lr()[0]   # the rate this step's update uses (the scheduler moves after it)
        dropped = False           # a ZeRO-0 update we dropped ourselves (DeepSpeed reports it applied)
        if self.pipeline:
            loss = engine.train_batch(data_iter=batches)
            losses = self._take_reported()
            bad = ~torch.isfinite(loss.detach().float().to(self.device)).all()
        else:
            losses = torch.zeros(2, device=self.device)
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
            for micro in range(self.gas):
                total, lm_part, vis_part = engine(next(batches))
                if faults.nan_loss_at(step_number):
                    total = total * float("nan")
                bad = bad | ~torch.isfinite(total.detach()).all()
                engine.backward(total)
                losses += torch.stack([lm_part.detach().float(), vis_part.detach().float()]) / self.gas
                if micro == self.gas - 1 and effective_zero_stage(self.cfg) == 0 and not self._all_finite(bad):
                    self._skip_zero0_update()
                    dropped = True
                else:
                    engine.step()
        # ZeRO-1/2/3 skip a non-finite update themselves (and say so here); ZeRO-0's we dropped.
        applied = engine.was_step_applied() and not dropped
        return {"losses": losses, "bad": bad, "applied": applied, "lr": lr,
                "grad_norm": engine.get_global_grad_norm() if applied else None,
                "digest": self.batch_digest}

    def _settle(self) -> List[Dict]:
        """Reads the pending step records off the device (one DP all-reduce of the losses, one
        world all-reduce of the non-finite flags), updates the skip counters and the history,
        and aborts on too many consecutive skips. Returns the settled records."""
        pending, self.pending = self.pending, []
        if not pending:
            return []
        losses = torch.stack([r["losses"] for r in pending]).double()
        if self.state.dp_group is not None:   # a DP group is one stage: all or none hold the head
            dist.all_reduce(losses, group=self.state.dp_group)
            losses /= self.state.dp
        bad = torch.stack([r["bad"] for r in pending]).float()
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # Gradient norms: tensors under ZeRO, read together with one copy.
        norms = [r["grad_norm"] for r in pending]
        on_device = [i for i, n in enumerate(norms) if isinstance(n, torch.Tensor)]
        if on_device:
            for i, v in zip(on_device, torch.stack([norms[i].detach().float().reshape(())
                                                    for i in on_device]).tolist()):
                norms[i] = v
        out = []
        for r, (lm, vis), nonfinite, norm in zip(pending, losses.tolist(), bad.tolist(), norms):
            finite = nonfinite == 0
            applied = r["applied"] and finite
            if applied:
                self.skipped_consecutive = 0
            else:
                self.skipped_total += 1
                # fp16 loss-scale overflows are routine; only non-finite losses/norms count to the abort.
                if not finite or not self.cfg.training.fp16:
                    self.skipped_consecutive += 1
            rec = {"lm": lm, "visual": vis, "applied": applied, "lr": r["lr"],
                   "grad_norm": float(norm) if norm is not None and applied else None}
            self.history.append(dict(rec, iteration=r["iteration"], consumed=r["consumed"],
                                     batch_digest=r["digest"]))
            self.window.append(rec)
            out.append(rec)
            if self.skipped_consecutive > self.cfg.training.max_skipped_steps:
                raise TrainingAborted(
                    f"iteration {r['iteration']}: {self.skipped_consecutive} consecutive updates skipped for a "
                    f"non-finite loss or gradient norm (--max-skipped-steps {self.cfg.training.max_skipped_steps}); "
                    f"aborting. Lower --lr, check the data, or resume from an earlier checkpoint.")
        return out

    # --- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> None:
        if self.data.valid is None:
            return
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
    def client_state(self) -> Dict:
        return {"consumed_train_samples": self.consumed, "skipped_total": self.skipped_total,
                "skipped_consecutive": self.skipped_consecutive,
                # what the HF export needs to place the [IMG]/[/IMG] rows (LoRA row deltas)
                "image_token_ids": list(self.data.image_token_ids), "tokenizer": self.data.tokenizer}

    def save(self) -> None:
        self._settle()   # the skip counters go into the checkpoint
        c = self.cfg.checkpoint
        tag = ckpt.save_checkpoint(self.engine, self.cfg, c.save, self.iteration, self.client_state(),
                                   self.tracker, c.keep_last, self.log)
        self.log(f"saved checkpoint {os.path.join(c.save, tag)} at iteration {self.iteration}")

    def resume(self) -> None:
        c = self.cfg.checkpoint
        if not c.load or self.built.loaded_from:
            return
        same_as_save = c.save and os.path.abspath(c.save) == os.path.abspath(c.load)
        if not os.path.isdir(c.load) and not same_as_save:
            # (--load DIR --save DIR on a first run is fine: nothing to resume yet.)
            raise ConfigError(f"--load {c.load}: no such directory")
        client = ckpt.load_checkpoint(self.engine, c.load, c.ckpt_step, self.tracker, self.log,
                                      fresh_start_ok=bool(same_as_save))
        if client is None:
            return
        self.iteration, self.consumed = client["iteration"], client["consumed_train_samples"]
        self.skipped_total = client.get("skipped_total", 0)
        self.skipped_consecutive = client.get("skipped_consecutive", 0)

    # --- the loop -----------------------------------------------------------------------
    def train(self, stop: StopRequest) -> int:
        cfg, t = self.cfg, self.cfg.training
        batches = self._batches(self.data.train, self.consumed)
        window_start = time.perf_counter()
        while self.iteration < t.train_iters:
            out = self.train_step(batches)
            self.iteration += 1
            self.consumed += self.data.global_batch
            self.pending.append(dict(out, iteration=self.iteration, consumed=self.consumed))
            self.batch_digest = 0
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
                self._settle()
                self._log_window(self.window, time.perf_counter() - window_start)
                self.window, window_start = [], time.perf_counter()
            if t.eval_interval and self.iteration % t.eval_interval == 0 and self.iteration < t.train_iters:
                self.evaluate()
            saved = False
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                    self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
                saved = True
            exiting = bool(t.exit_interval) and self.iteration % t.exit_interval == 0
            if stop.agreed(self.device) or exiting:
                self._settle()
                if cfg.checkpoint.save and not saved:
                    self.save()
                why = f"--exit-interval {t.exit_interval}" if exiting else "a termination signal"
                self.log(f"stopping at iteration {self.iteration} on {why}"
                         + ("" if cfg.checkpoint.save else " (no --save: nothing written)"))
                return 0
        self._settle()
        self.evaluate()
        if cfg.checkpoint.save and (not cfg.checkpoint.save_interval or self.iteration % cfg.checkpoint.save_interval):
            self.save()
        return 0

    def _log_window(self, window: List[Dict], seconds: float) -> None:
        applied = [w for w in window if w["applied"]] or window
        lm = sum(w["lm"] for w in applied) / len(applied)
        vis = sum(w["visual"] for w in applied) / len(applied)
        norms = [w["grad_norm"] for w in applied if w["grad_norm"] is not None]
        scale = None
        if self.cfg.training.fp16:   # FP16_Optimizer keeps cur_scale; the ZeRO optimizers expose loss_scale
            opt = self.engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        stats = StepStats(self.iteration, self.cfg.training.train_iters, self.consumed, lm, vis,
                          window[-1]["lr"], sum(norms) / len(norms) if norms else None,
                          self.skipped_total, seconds / len(window), self.data.global_batch, scale)
        rates = throughput(stats, self.cfg, self.world)
        if not self.kernels_logged and self.reporting:   # once, after a step really ran them, by the
            self.kernels_logged = True                   # rank that holds the head (every op runs there)
            used = implementations()
            print("kernels (--fused-kernels " + self.cfg.model.fused_kernels + "): "
                  + ", ".join(f"{op}={used[op]}" for op in sorted(used)), flush=True)
        if self.reporting:
            print(format_line(stats, rates), flush=True)
            scalars = {"train/lm_loss": lm, "train/visual_loss": vis, "train/lr": stats.lr,
                       "train/grad_norm": stats.grad_norm or float("nan"), "train/skipped_total": self.skipped_total}
            scalars.update({f"perf/{k}": v for k, v in rates.items()})
            self.sinks.scalars(scalars, self.iteration)


def parser(description: str = "Pretrain VL-GPT on packed interleaved image-text data (DeepSpeed)."):
    return build_parser(description)


def pretrain(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> "Trainer":
    """Runs a whole pretraining job; returns the Trainer (exit_code, history)."""
    cfg, _ = load_config(argv, parser=parser(description) if description else parser())
    launch = detect_launch()
    world = launch.world_size
    validate(cfg, world)                 # refuse bad layouts before any process-group work
    device = torch.device("cuda", launch.local_rank) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cpu" and cfg.training.fp16:
        raise ConfigError("--fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no float16 "
                          "training); use --bf16 on CPU")
    try:
        check_required(cfg.model.fused_kernels, device.type)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # denormal exp() in the softmax tail is ~100x slower on CPU
    owns_group = not dist.is_initialized()
    init_distributed(cfg.parallel.distributed_backend, single_process_group=True, launch=launch)
    rank = launch.rank
    if rank == 0:
        print(launch.describe(), flush=True)
    p = cfg.parallel
    state = ParallelState.build(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    tracker = seed_everything(cfg.training.seed, state.tp_rank, state.pp_rank, device.type)
    c = cfg.checkpoint
    if c.load and c.save and os.path.abspath(c.load) != os.path.abspath(c.save) and \
            ckpt.is_release(c.load) and ckpt.read_latest(c.save) not in (None, "release"):
        # A requeued job keeps its command line: once --save holds a checkpoint, resume from it.
        if rank == 0:
            print(f"{c.save} holds checkpoint {ckpt.read_latest(c.save)}: resuming from it, not from the "
                  f"pretrained weights in {c.load}", flush=True)
        c.load = c.save
    data = build_data(cfg, world)
    built = build_model(cfg, state, tracker, data.image_token_ids, log=print if rank == 0 else (lambda m: None))
    if device.type == "cuda":
        built.module.to(device)
    engine, _ = initialize_engine(cfg, state, built, world)
    trainer = Trainer(cfg, state, engine, built, data, tracker, device, world)
    trainer.log(f"VL-GPT: world {world} = tp {state.tp} x pp {state.pp} x dp {state.dp}, "
                f"ZeRO-{effective_zero_stage(cfg)}, "
                f"{'bf16' if cfg.training.bf16 else 'fp16' if cfg.training.fp16 else 'fp32'}, "
                f"global batch {data.global_batch} (micro {cfg.training.micro_batch_size} x "
                f"accumulation {trainer.gas} x dp {state.dp}); parameters on rank 0: "
                f"{built.counts['trainable']:,} trainable, {built.counts['frozen']:,} frozen")
    trainer.resume()
    stop = StopRequest()
    try:
        trainer.exit_code = trainer.train(stop)
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        trainer.exit_code = 1
    trainer.sinks.close()
    if owns_group and dist.is_initialized():
        if trainer.exit_code == 0:
            dist.barrier()
        dist.destroy_process_group()
    return trainer


def run(argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> int:
    """pretrain() with configuration errors reported as one line, exit code 2."""
    try:
        return pretrain(argv, description).exit_code
    except (ConfigError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
