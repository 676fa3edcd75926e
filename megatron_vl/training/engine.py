"""The training loop every stage shares, on a DeepSpeed engine: optimizer steps with gradient
accumulation, the NaN/skip policy, stop signals (SIGTERM / SIGUSR1: finish the step, save,
exit 0), --exit-interval, checkpoints with exact resume, and the log window (console line,
TensorBoard, wandb).

A stage subclasses ``Trainer`` and supplies what is its own: ``loss_names`` (the parts its
model returns after the total), ``batches`` (micro-batches from a data position),
``log_window`` (its console line and scalars), and optionally ``evaluate``,
``extra_client_state`` / ``restore_client_state`` (its data position and metadata) and
``write_export`` (files written into each checkpoint before it is committed).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..atomic import same_path
from ..config import ConfigError, effective_zero_stage
from ..checkpoint.layout import CheckpointError
from .checkpointing import load_checkpoint, save_checkpoint
from . import faults
from . import save_rules
from .metrics import Sinks
from .preflight import check_build_locks


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
    """The shared loop. `dp_group`/`dp`: the data-parallel group the losses are averaged
    over (None when the whole world is one group or there is one rank); `reporting`: whether
    this rank prints the log lines (the one that holds the losses)."""

    loss_names: Sequence[str] = ("loss",)
    pipeline = False

    def __init__(self, cfg, engine, device, world: int, global_batch: int, tracker, dp_group, dp: int,
                 reporting: bool):
        self.cfg, self.engine, self.device, self.world = cfg, engine, device, world
        self.global_batch, self.tracker, self.dp_group, self.dp = global_batch, tracker, dp_group, dp
        self.reporting = reporting
        self.gas = engine.gradient_accumulation_steps()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.iteration = self.consumed = self.skipped_total = self.skipped_consecutive = 0
        self.saved_iteration: Optional[int] = None   # the checkpoint on disk for self.iteration
        self.start_iteration = 0                      # where this run started (after resume)
        c = cfg.checkpoint
        # what each checkpoint records as its run's start (a requeue recognises its own by it)
        self.origin = save_rules.run_origin(c.load, c.save, c.ckpt_step, bool(getattr(c, "finetune", False)))
        self.exit_code: Optional[int] = None
        self.batch_digest = 0
        self.history: List[Dict] = []    # per iteration, for tests and tools: losses, samples, skips
        self.pending: List[Dict] = []    # step records not yet read off the device (see _settle)
        self.window: List[Dict] = []     # settled records not yet logged
        self.sinks = Sinks(cfg, reporting, self.log_all)

    # --- what a stage supplies ----------------------------------------------------------
    def batches(self, consumed: int) -> Iterator:
        """Micro-batches from the position `consumed` (global samples) on."""
        raise NotImplementedError

    def forward(self, batch):
        """(total loss to backpropagate, [len(loss_names)] detached parts)."""
        out = self.engine(batch)
        return out[0], torch.stack([p.detach().float() for p in out[1:]])

    def pipeline_step(self, batches):
        """(parts, non-finite flag) of one pipelined step; pipelined stages only."""
        raise NotImplementedError

    def evaluate(self) -> None:
        pass

    def extra_client_state(self) -> Dict:
        return {}

    def restore_client_state(self, client: Dict) -> None:
        pass

    def write_export(self, tag_dir: str) -> None:
        """Writes files into a checkpoint directory before it is committed (every rank calls it)."""

    def log_window(self, losses: Dict[str, float], lr: float, grad_norm: Optional[float], seconds_per_step: float,
                   loss_scale: Optional[float]) -> None:
        raise NotImplementedError

    # --- logging ------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def log_all(self, msg: str) -> None:
        print(msg, flush=True)

    # --- one step -----------------------------------------------------------------------
    # Nothing in a step waits for the device: losses and the non-finite flag stay on it and are
    # read once per --log-interval (_settle). The exceptions: ZeRO-0's own skip decision (one
    # all-reduce per step, ZeRO-0 only) and the stop-signal agreement (one per step).
    def _all_finite(self, bad: torch.Tensor) -> bool:
        flag = bad.detach().float().reshape(1).to(self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

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
            losses, bad = self.pipeline_step(batches)
        else:
            losses = torch.zeros(len(self.loss_names), device=self.device)
            bad = torch.zeros((), dtype=torch.bool, device=self.device)
            for micro in range(self.gas):
                total, parts = self.forward(next(batches))
                if faults.nan_loss_at(step_number):
                    total = total * float("nan")
                bad = bad | ~torch.isfinite(total.detach()).all()
                engine.backward(total)
                losses += parts.to(self.device) / self.gas
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
        if self.dp_group is not None:   # a DP group is one stage: all or none hold the losses
            dist.all_reduce(losses, group=self.dp_group)
            losses /= self.dp
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
        for r, values, nonfinite, norm in zip(pending, losses.tolist(), bad.tolist(), norms):
            finite = nonfinite == 0
            applied = r["applied"] and finite
            if applied:
                self.skipped_consecutive = 0
            else:
                self.skipped_total += 1
                # fp16 loss-scale overflows are routine; only non-finite losses/norms count to the abort.
                if not finite or not self.cfg.training.fp16:
                    self.skipped_consecutive += 1
            rec = dict(zip(self.loss_names, values), applied=applied, lr=r["lr"],
                       grad_norm=float(norm) if norm is not None and applied else None)
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

    # --- checkpoints --------------------------------------------------------------------
    def client_state(self) -> Dict:
        return dict({"consumed_train_samples": self.consumed, "skipped_total": self.skipped_total,
                     "skipped_consecutive": self.skipped_consecutive}, **self.extra_client_state())

    def save(self) -> None:
        self._settle()   # the skip counters go into the checkpoint
        c = self.cfg.checkpoint
        tag = save_checkpoint(self.engine, self.cfg, c.save, self.iteration, self.client_state(),
                                   self.tracker, c.keep_last, self.log, before_commit=self.write_export,
                                   origin=self.origin)
        self.saved_iteration = self.iteration
        self.log(f"saved checkpoint {os.path.join(c.save, tag)} at iteration {self.iteration}")

    def resume(self) -> None:
        c = self.cfg.checkpoint
        if not c.load:
            return
        same_as_save = same_path(c.save, c.load)
        if not os.path.isdir(c.load) and not same_as_save:
            # (--load DIR --save DIR on a first run is fine: nothing to resume yet.)
            raise CheckpointError(f"--load {c.load}: no such directory")
        client = load_checkpoint(self.engine, c.load, c.ckpt_step, self.tracker, self.log,
                                      fresh_start_ok=bool(same_as_save))
        if client is None:
            return
        self.iteration, self.consumed = client["iteration"], client["consumed_train_samples"]
        self.skipped_total = client.get("skipped_total", 0)
        self.skipped_consecutive = client.get("skipped_consecutive", 0)
        self.restore_client_state(client)
        if same_as_save:
            self.saved_iteration = self.iteration
        self.continue_schedule(client)

    def continue_schedule(self, client: Dict) -> None:
        """After a resume the learning-rate schedule is this run's flags (--lr, --min-lr, warmup,
        decay style, --lr-decay-iters / --train-iters) at the checkpoint's step: the optimizer's
        restored rate is the old schedule's (0 at the end of a finished cosine), and a longer
        --train-iters must continue on the new schedule from the first resumed step. A change
        against the checkpoint's run is said in one line."""
        sched = getattr(self.engine, "lr_scheduler", None)
        if sched is None or not hasattr(sched, "lr_lambdas"):
            return
        o = self.cfg.optimizer
        sched.base_lrs = [o.lr] * len(sched.base_lrs)
        lrs = [base * f(sched.last_epoch) for f, base in zip(sched.lr_lambdas, sched.base_lrs)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = list(lrs)
        then = client.get("config") or {}
        changes = []
        for section, key, flag in (("training", "train_iters", "--train-iters"), ("optimizer", "lr", "--lr"),
                                   ("optimizer", "min_lr", "--min-lr"), ("optimizer", "lr_warmup_iters",
                                   "--lr-warmup-iters"), ("optimizer", "lr_decay_iters", "--lr-decay-iters"),
                                   ("optimizer", "lr_decay_style", "--lr-decay-style")):
            old = (then.get(section) or {}).get(key, getattr(getattr(self.cfg, section), key, None))
            new = getattr(getattr(self.cfg, section), key, None)
            if old != new:
                changes.append(f"{flag} {new} (checkpoint: {old})")
        if changes and lrs:
            self.log(f"note: learning-rate schedule rebuilt for {', '.join(changes)} at step {sched.last_epoch}: "
                     f"iteration {self.iteration + 1} uses lr {lrs[0]:.6E}")

    # --- the loop -----------------------------------------------------------------------
    def train(self, stop: StopRequest) -> int:
        cfg, t = self.cfg, self.cfg.training
        batches = self.batches(self.consumed)
        window_start = time.perf_counter()
        while self.iteration < t.train_iters:
            out = self.train_step(batches)
            self.iteration += 1
            self.consumed += self.global_batch
            self.pending.append(dict(out, iteration=self.iteration, consumed=self.consumed))
            self.batch_digest = 0
            if self.iteration % cfg.logging.log_interval == 0 or self.iteration == t.train_iters:
                self._settle()
                self._log_window(time.perf_counter() - window_start)
                window_start = time.perf_counter()
            # Evaluations and checkpoints are no part of a step's time (Megatron's interval timer
            # stops around both): the window's clock moves past them.
            paused = time.perf_counter()
            if t.eval_interval and self.iteration % t.eval_interval == 0 and self.iteration < t.train_iters:
                self.evaluate()
            saved = False
            if cfg.checkpoint.save and cfg.checkpoint.save_interval and \
                    self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
                saved = True
            window_start += time.perf_counter() - paused
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
        # A run that trained nothing (--train-iters 0, or a resumed run with nothing left) writes
        # nothing: its checkpoint would be a copy, or replace one in place.
        if cfg.checkpoint.save and self.saved_iteration != self.iteration:
            if self.iteration > self.start_iteration:
                self.save()
            else:
                self.log(f"no iteration trained (at {self.iteration} of --train-iters {t.train_iters}): no checkpoint "
                         f"written to {cfg.checkpoint.save}")
        return 0

    def _log_window(self, seconds: float) -> None:
        window, self.window = self.window, []
        applied = [w for w in window if w["applied"]] or window
        losses = {name: sum(w[name] for w in applied) / len(applied) for name in self.loss_names}
        norms = [w["grad_norm"] for w in applied if w["grad_norm"] is not None]
        scale = None
        if self.cfg.training.fp16:   # FP16_Optimizer keeps cur_scale; the ZeRO optimizers expose loss_scale
            opt = self.engine.optimizer
            scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
        self.log_window(losses, window[-1]["lr"], sum(norms) / len(norms) if norms else None,
                        seconds / len(window), scale)

    def finish(self, owns_group: bool) -> None:
        self.sinks.close()
        if owns_group and dist.is_initialized():
            if self.exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()


def start_process(cfg, validate: Callable[[int], None]):
    """Reads the launcher's environment, refuses bad settings before any process-group work,
    picks the device and joins the process group. Returns (launch, device, owns_group)."""
    from ..parallel.launcher import detect_launch
    from ..parallel.state import init_distributed
    launch = detect_launch()
    faults.check()
    validate(launch.world_size)
    # A --load that names nothing: refused now, not after the model and DeepSpeed are set up
    # (every rank reads the same files and stops with the same line).
    c = cfg.checkpoint
    save_rules.check_load_path(c.load, c.save, c.ckpt_step, bool(c.finetune))
    device = torch.device("cuda", launch.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and cfg.training.fp16:
        raise ConfigError("--fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no float16 "
                          "training); use --bf16 on CPU")
    if device.type == "cpu":
        torch.set_flush_denormal(True)   # denormal exp() in softmax tails is ~100x slower on CPU
        # Every rank checks (cheap: the same files, the same verdict) and so stops with the same
        # line: one rank stopping alone would leave the others waiting in the rendezvous below.
        check_build_locks(log=print if launch.local_rank == 0 else (lambda m: None))
    owns_group = not dist.is_initialized()
    init_distributed(cfg.parallel.distributed_backend, single_process_group=True, launch=launch,
                     timeout_minutes=cfg.parallel.distributed_timeout_minutes)
    if launch.rank == 0:
        print(launch.describe(), flush=True)
    return launch, device, owns_group


def exit_code(job: Callable[[], Trainer]) -> int:
    """Runs a training job: a user error (configuration, launch: exit 2; checkpoint, data, lock,
    disk full: exit 1) is one line on stderr, no traceback (MEGATRON_VL_DEBUG=1 shows it)."""
    from ..errors import run_cli
    return run_cli(lambda: job().exit_code)


def run_training(trainer: Trainer, owns_group: bool) -> Trainer:
    """resume, train under the stop-signal handler, map an abort to exit 1, tear down."""
    import sys
    trainer.resume()
    trainer.start_iteration = trainer.iteration
    stop = StopRequest()
    try:
        trainer.exit_code = trainer.train(stop)
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        trainer.exit_code = 1
    trainer.finish(owns_group)
    return trainer
