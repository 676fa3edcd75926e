"""The --save rules: which ``--save`` / ``--load`` combinations a run may use, decided before the
run builds anything (preflight.py calls them, rank 0 holding ``--save``'s lock). Why: a run
never overwrites or rewinds checkpoints it did not write, and never loads one it cannot use
(another stage's, or one whose files come from two saves). The on-disk format they read
(tags, ``latest``, stage.json, manifest.json, origin.json) is checkpoint.py's.

Rules for ``--save DIR`` (save_dir_problems; a run never overwrites or rewinds checkpoints it
did not resume from): checkpoints there need ``--load DIR`` (resume them) or another --save;
``--load A --save B`` is refused when B holds checkpoints newer than the one A resumes from;
a stage never saves into a directory of another stage's checkpoints; ``--ckpt-step N`` with
--load = --save is a deliberate rewind (said in one line): the newer checkpoints are replaced
as the run reaches them. Tag directories newer than the one ``latest`` names were never
committed (a save killed or out of space, or a rewind's abandoned ones): the next run on DIR
removes them, saying so; without a valid ``latest`` (missing, empty, garbage, naming no tag there)
nothing tells committed tags from those, and a run on DIR is refused with every file kept. A
whole run holds ``DIR/training.lock``. ``--load A --save B`` where B holds A's iteration or a
newer one is refused, except for a requeued job (same command line): ``origin.json`` in each
checkpoint records the --load its run started from (a run resumed from B inherits B's), and
when B's newest started from A the run resumes B instead (requeue_redirect).

--load is checked too: check_load_stage refuses another stage's checkpoint by name, and
mixed_files_problem one whose files come from two different saves.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import zipfile
from typing import Any, Callable, Dict, Optional

import torch

from ..atomic import remove_stale_temps, same_path
from ..checkpoint.layout import (IMAGE_TOKENIZER_DIR, LATEST, MANIFEST, ORIGIN, STAGE_FILE, STAGE_NAMES,
                                 CheckpointError, is_release, list_tags, read_latest, tag_iteration, tag_name)
from .checkpointing import _unreadable


def latest_problem(save_dir: str, tags) -> Optional[str]:
    """Why ``latest`` does not name one of `tags` (the tag directories there), or None."""
    path = os.path.join(save_dir, LATEST)
    if not os.path.exists(path):
        return "is missing"
    if not os.path.isfile(path):
        return "is not a file"
    text = read_latest(save_dir)
    if text is None:
        return "is empty"
    it = tag_iteration(text)
    if it is None:
        return f"says {text[:40]!r}, not a checkpoint tag (iter_NNNNNNN)"
    if it not in tags:
        return f"names {text}, which is not there"
    return None


def read_origin(save_dir: str, tag: Optional[str]) -> Optional[Dict[str, Any]]:
    """Where the run that wrote checkpoint `tag` started from ({"load": absolute --load or
    None, "iteration": N}), None when unrecorded (written before origins were recorded)."""
    import json
    if not tag:
        return None
    try:
        with open(os.path.join(save_dir, tag, ORIGIN)) as fh:
            origin = json.load(fh)
        return origin if isinstance(origin, dict) and "load" in origin else None
    except (OSError, ValueError):
        return None


def _start_iteration(load_dir: str, ckpt_step: Optional[int], finetune: bool) -> Optional[int]:
    """The iteration a run with --load load_dir starts from (None: no checkpoint named there)."""
    if finetune or is_release(load_dir):
        return 0
    return ckpt_step if ckpt_step is not None else tag_iteration(read_latest(load_dir))


def run_origin(load_dir: Optional[str], save_dir: Optional[str], ckpt_step: Optional[int],
               finetune: bool) -> Dict[str, Any]:
    """What every checkpoint of this run records as its origin: --load and the iteration it
    starts from; a run resumed from --save itself inherits the origin of the checkpoint it
    resumes (so a requeued job's checkpoints keep pointing at the directory it started from)."""
    if not load_dir:
        return {"load": None, "iteration": 0}
    if same_path(load_dir, save_dir):
        tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
        return read_origin(load_dir, tag) or {"load": None, "iteration": tag_iteration(tag) or 0}
    return {"load": os.path.abspath(load_dir), "iteration": _start_iteration(load_dir, ckpt_step, finetune)}


def requeue_redirect(load_dir: Optional[str], save_dir: Optional[str], ckpt_step: Optional[int],
                     finetune: bool) -> Optional[str]:
    """--load A --save B when B already holds checkpoints of this very run (a requeued job keeps
    its command line): the note to print before resuming from B instead, or None (A stays).
    B's checkpoints are this run's when A is a release / a --finetune start (iteration 0), or
    when B's newest records that its run started from A (origin.json) and is not older than
    where A starts now. --ckpt-step numbers A's checkpoints: refused with a redirect."""
    if not load_dir or not save_dir or same_path(load_dir, save_dir):
        return None
    latest = read_latest(save_dir)
    newest = tag_iteration(latest)
    if newest is None or not os.path.isdir(os.path.join(save_dir, latest)):
        return None
    if is_release(load_dir) or finetune:
        note = (f"{save_dir} holds checkpoint {latest}: resuming from it, not from the pretrained weights in "
                f"{load_dir}")
    else:
        origin = read_origin(save_dir, latest) or {}
        if not same_path(origin.get("load"), load_dir):
            return None
        start = _start_iteration(load_dir, ckpt_step, False)
        if start is not None and newest < start:
            return None   # A has moved past this run's checkpoints: the usual rules decide
        note = (f"{save_dir} holds checkpoint {latest} of this run (started from {load_dir} at "
                f"{tag_name(int(origin.get('iteration') or 0))}): resuming from it, not from {load_dir}")
    if ckpt_step is not None:
        raise CheckpointError(f"--ckpt-step {ckpt_step} numbers the checkpoints of --load {load_dir}, but --save "
                              f"{save_dir} already holds {latest} of this run, which a restart resumes instead: drop "
                              f"--ckpt-step to resume {save_dir}, pass --load {save_dir} --ckpt-step N to rewind it, "
                              "or choose a new --save to start over")
    return note


def check_load_path(load_dir: Optional[str], save_dir: Optional[str], ckpt_step: Optional[int],
                    finetune: bool) -> None:
    """A --load that names nothing to load, refused (exit 1) before the run builds anything (a
    mistyped path used to fail only after the model and DeepSpeed were set up): a missing path,
    a file, a directory without ``latest`` or without the checkpoint --ckpt-step / ``latest``
    names. --load = --save is a first run's (nothing there yet: fine), and a requeued job that
    resumes --save instead (requeue_redirect) does not read --load at all. Pure reads: every
    rank may call it and reach the same verdict."""
    if not load_dir or same_path(load_dir, save_dir) or requeue_redirect(load_dir, save_dir, ckpt_step, finetune):
        return
    if not os.path.exists(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: a file, not a checkpoint directory")
    if is_release(load_dir):
        return
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None:
        raise CheckpointError(f"--load {load_dir}: no checkpoint there ('{LATEST}' missing, and it is not "
                              "--save, where a first run starts fresh); check the path")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        tags = list_tags(load_dir)
        there = f"; there: {', '.join(tag_name(i) for i in tags[-3:])}" if tags else "; no iter_* there"
        said = "--ckpt-step" if ckpt_step is not None else f"'{LATEST}'"
        raise CheckpointError(f"{load_dir}: checkpoint {tag} does not exist ({said} names it{there})")


def checkpoint_stage(load_dir: str, tag: str) -> str:
    """'tokenizer', 'pretrain' or 'instruct': stage.json, else (older checkpoints) stage 1 by its
    exported image tokenizer or its config, else pretraining."""
    import json
    path = os.path.join(load_dir, tag)
    try:
        with open(os.path.join(path, STAGE_FILE)) as fh:
            stage = json.load(fh).get("stage")
        if stage in STAGE_NAMES:
            return stage
    except (OSError, ValueError, AttributeError):
        pass
    if os.path.isdir(os.path.join(path, IMAGE_TOKENIZER_DIR)):
        return "tokenizer"
    try:
        with open(os.path.join(path, "config.yaml")) as fh:
            if re.search(r"^\s+clip_model:", fh.read(), re.M):
                return "tokenizer"
    except OSError:
        pass
    return "pretrain"


def check_load_stage(load_dir: Optional[str], ckpt_step: Optional[int], stage: str) -> None:
    """Refuses --load of another stage's checkpoint by name (stage 3 takes stage 2's too)."""
    if not load_dir:
        return
    tag = tag_name(ckpt_step) if ckpt_step is not None else read_latest(load_dir)
    if tag is None or tag == "release" or not os.path.isdir(os.path.join(load_dir, tag)):
        return
    theirs = checkpoint_stage(load_dir, tag)
    accepted = {"tokenizer": ("tokenizer",), "pretrain": ("pretrain", "instruct"),
                "instruct": ("pretrain", "instruct")}[stage]
    if theirs not in accepted:
        wanted = " or ".join(STAGE_NAMES[s].split(" (")[0] for s in accepted)
        hint = (" (the image tokenizer reaches stages 2 and 3 through tools/extract_image_features.py's feature "
                "store)" if theirs == "tokenizer" else "")
        raise CheckpointError(f"--load {load_dir}: {tag} is a {STAGE_NAMES[theirs]} checkpoint, not a {wanted} one; "
                              f"this is a {STAGE_NAMES[stage]} run{hint}")


def save_dir_problems(save_dir: str, load_dir: Optional[str], ckpt_step: Optional[int], finetune: bool,
                      stage: str, log: Callable[[str], None] = print) -> None:
    """Refuses (CheckpointError) a run that would overwrite or rewind checkpoints in --save
    it does not resume from (rules: module docstring); then removes what earlier saves left
    uncommitted there (only tags strictly above the one a valid ``latest`` names). Called by
    one rank, holding the directory's lock."""
    if not os.path.isdir(save_dir):
        return
    latest = read_latest(save_dir)
    if latest == "release":
        raise CheckpointError(f"--save {save_dir} is a release checkpoint (`latest` says release: import-hf's "
                              "output); training writes its checkpoints into a directory of its own: choose a "
                              "new --save (and --load this one)")
    tags = list_tags(save_dir)
    same = same_path(load_dir, save_dir)
    bad = latest_problem(save_dir, tags) if tags else None
    if bad and not (same and ckpt_step in tags):
        # Without a valid `latest` nothing tells committed tags from a killed save's: touch none.
        marker = os.path.join(save_dir, LATEST)
        listed = ", ".join(tag_name(t) for t in tags)
        raise CheckpointError(f"{marker} {bad}, but {save_dir} holds {listed}: nothing there is removed or "
                              f"overwritten. Write the tag of the checkpoint to resume into it (echo "
                              f"{tag_name(tags[-1])} > {marker}), or resume one with --load {save_dir} --ckpt-step N")
    last = ckpt_step if bad else tag_iteration(latest)
    committed = tags if bad else [t for t in tags if last is not None and t <= last]
    if committed:
        shown = tag_name(last) if last in tags else tag_name(committed[-1])
        theirs = checkpoint_stage(save_dir, shown)
        if theirs != stage:
            raise CheckpointError(f"--save {save_dir} holds {STAGE_NAMES[theirs]} checkpoints (`latest`: {latest}); "
                                  f"this {STAGE_NAMES[stage]} run would write over them: choose a new --save")
        if not load_dir:
            raise CheckpointError(f"--save {save_dir} already holds checkpoints (`latest`: {latest}) and no --load "
                                  f"was given: pass --load {save_dir} to resume from them, or choose a new --save")
        if same and not finetune:
            start = ckpt_step if ckpt_step is not None else last
            newer = [tag_name(t) for t in committed if t > start]
            if newer and bad:
                log(f"note: --ckpt-step {ckpt_step}: {os.path.join(save_dir, LATEST)} {bad}; this run resumes "
                    f"{tag_name(start)} and replaces {', '.join(newer)} as it reaches them (to keep them, resume "
                    "into a new --save)")
            elif newer:
                log(f"note: --ckpt-step {ckpt_step} rewinds {save_dir} to {tag_name(start)} although `latest` "
                    f"names {latest}: this run replaces {', '.join(newer)} as it reaches them (to keep them, "
                    "resume into a new --save)")
        else:
            from_release = is_release(load_dir)
            start = _start_iteration(load_dir, ckpt_step, finetune) or 0
            # A tag at the start iteration is as much in the way as a newer one: this run did not write it.
            if committed[-1] >= start:
                newest = tag_name(committed[-1])
                if same:
                    raise CheckpointError(f"--finetune starts at iteration 0, and --save {save_dir} holds "
                                          f"checkpoints up to {newest} that it would overwrite: choose a new --save")
                what = "its weights only (iteration 0)" if finetune or from_release else tag_name(start)
                order = ("newer than what" if committed[-1] > start else
                         "written by another run at the iteration that")
                raise CheckpointError(f"--save {save_dir} holds {newest}, {order} --load {load_dir} "
                                      f"starts from ({what}): this run would overwrite it. To continue that "
                                      f"run, pass --load {save_dir}; otherwise choose a new --save")
    if not bad:
        for t in tags:
            if t not in committed:
                path = os.path.join(save_dir, tag_name(t))
                shutil.rmtree(path, ignore_errors=True)
                log(f"note: removed {path}: newer than the checkpoint `latest` names ({latest or 'none'}), so never "
                    "committed (a save killed or out of space, or abandoned by a --ckpt-step rewind)")
    remove_stale_temps(save_dir, log=log)


def mixed_files_problem(load_dir: str, tag: str) -> Optional[str]:
    """Why the checkpoint's files are not all of one save, or None: against its manifest, or
    (older checkpoints) by DeepSpeed's config recorded in each model/optimizer file."""
    import json
    path = os.path.join(load_dir, tag)
    hint = ("files of two different saves (another run saved into this directory?); it cannot be loaded: resume "
            "from another checkpoint with --ckpt-step, or from the run that wrote it")
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            listed = json.load(fh)["files"]
    except FileNotFoundError:
        listed = None
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path}/{MANIFEST}: unreadable manifest; {hint}"
    if listed is not None:
        for rel, size in sorted(listed.items()):
            f = os.path.join(path, rel)
            if os.path.isfile(f) and os.path.getsize(f) != size:
                if f.endswith(".pt") and not zipfile.is_zipfile(f):
                    return _unreadable(f)
                return (f"{f}: {os.path.getsize(f)} bytes, the checkpoint's manifest says {size} (truncated, or "
                        f"overwritten by another save); resume from another checkpoint with --ckpt-step")
        for f in sorted(glob.glob(os.path.join(path, "**", "*.pt"), recursive=True)):
            if os.path.relpath(f, path) not in listed:
                return f"{f}: not part of this checkpoint (not in its manifest): {hint}"
        return None
    # An older checkpoint (no manifest). Only the engine's model-state files are opened (one per
    # model-parallel rank; lazily: no tensor is read): each records DeepSpeed's configuration and
    # the data-parallel size, which the optimizer files must match. Unpickling every rank's
    # optimizer file here, on rank 0 while the others wait, would not scale.
    configs, dp_sizes = {}, set()
    for f in sorted(glob.glob(os.path.join(path, "mp_rank_*_model_states.pt"))):
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
        except Exception:   # noqa: BLE001 - unreadable files are named by check_checkpoint_files
            continue
        if isinstance(sd, dict):
            configs[f] = repr(sd.get("ds_config"))
            if isinstance(sd.get("dp_world_size"), int):
                dp_sizes.add(sd["dp_world_size"])
    if len(set(configs.values())) > 1:
        first = next(iter(configs.values()))
        odd = next(f for f, c in configs.items() if c != first)
        return f"{odd}: written with another DeepSpeed configuration than {next(iter(configs))}: {hint}"
    if len(dp_sizes) == 1:
        dp = dp_sizes.pop()
        for f in sorted(glob.glob(os.path.join(path, "*zero_pp_rank_*_optim_states.pt"))):
            m = re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f))
            if m and int(m.group(1)) >= dp:
                return (f"{f}: the optimizer state of data-parallel rank {m.group(1)}, but the checkpoint's model "
                        f"states were written by {dp} data-parallel rank(s): {hint}")
    return None
