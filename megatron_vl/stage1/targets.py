"""Stage 1's regression targets (e_v from the IP-Adapter image encoder, e_t from SD's text
encoder), computed on the fly or read back from precomputed stores.

A frozen ViT-H forward per image per epoch is most of a stage-1 step, so
``tools/precompute_tokenizer_targets.py`` can run the encoders once: one store per shard,
``<targets-dir>/<shard name>-<hash of its path>.safetensors`` holding ``image`` [n, 257, 1280]
and ``text`` [n, 77, 768] in float16, row i for the i-th readable pair of the shard, and in
its metadata the sample keys, the shard's size, modification time and a hash of its bytes
(blake2b; a shard rewritten at the same size, e.g. with other captions, is recomputed, never
silently reused) and the encoder directories. Training trusts a store whose recorded size and
modification time still match the shard (reading every shard twice would double the data
reads) and hashes the shard only when they differ; precompute always hashes, since it is the
tool that vouches for a store. Stores of format 1 (no hash) stay usable, so a corpus's ViT-H
targets are not recomputed for a format change: one is current when its shard has the recorded
size and was not modified after the store was written; precompute then records the hash in it.
Targets are float16 on both paths (the on-the-fly ones are rounded the same way), so a run reads the same
numbers either way and the two give equal losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..atomic import temp_name
from ..data.formats import Report, read_wds_pairs
from ..errors import InputError, OutputError
from ..model.detokenizer_targets import ImageConditionEncoder, TextConditionEncoder

TARGET_DTYPE = torch.float16
STORE_VERSION = 2   # 2: stores carry the shard's content hash (and size, mtime); 1 (size only) is still read
_hashes: dict = {}  # (path, size, mtime_ns) -> hash: a shard is hashed once per process


def split_where(where: str) -> Tuple[str, str]:
    """'path/to/shard.tar:key' -> (shard, key) (paths may hold ':'; keys do not)."""
    shard, _, key = where.rpartition(":")
    return shard, key


class TargetEncoders:
    """The frozen encoders, on `device`: images (PIL) and captions -> float16 targets."""

    def __init__(self, image_encoder_dir: str, sd_dir: str, device="cpu"):
        self.image = ImageConditionEncoder(image_encoder_dir).to(device)
        self.text = TextConditionEncoder(sd_dir).to(device)
        self.device = torch.device(device)
        self.sources = {"image_encoder": os.path.abspath(image_encoder_dir), "sd_model": os.path.abspath(sd_dir)}

    def inputs(self, images: Sequence, captions: Sequence[str]):
        """CPU-side preprocessing (the data thread runs it): (pixel values, token ids)."""
        return self.image.pixels(images), self.text.token_ids(list(captions))

    @torch.no_grad()
    def __call__(self, ip_pixels: torch.Tensor, token_ids: torch.Tensor):
        e_v = self.image(ip_pixels.to(self.device)).to(TARGET_DTYPE)
        e_t = self.text(token_ids.to(self.device)).to(TARGET_DTYPE)
        return e_v, e_t


def shard_stat(shard: str) -> Tuple[int, int]:
    st = os.stat(shard)
    return st.st_size, st.st_mtime_ns


def shard_digest(shard: str) -> str:
    """blake2b of the shard's bytes (streamed): what its targets were computed from."""
    st = os.stat(shard)
    key = (os.path.abspath(shard), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.blake2b(digest_size=16)
        with open(shard, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


class Verdict(NamedTuple):
    """What a store's metadata says of the shard as it is now: ``stale`` (why it must not be
    used) or None; ``rewrite`` (why its metadata should be brought up to date: a format-1 store,
    or a shard with a new mtime and the same bytes) or None; ``stat`` the shard's (size, mtime_ns)."""
    stale: Optional[str]
    rewrite: Optional[str]
    stat: Tuple[int, int]


def judge_store(meta: dict, shard: str, path: str, verify: bool) -> Verdict:
    """Whether the store at ``path`` (metadata ``meta``) was made from the shard's current bytes.
    ``verify``: hash the shard even when its recorded size and mtime match (precompute);
    training passes False and hashes only when they differ."""
    size, mtime_ns = stat = shard_stat(shard)
    version = meta.get("version")
    if version not in ("1", str(STORE_VERSION)):
        return Verdict(f"written by another version (store format {version}, this one reads 1 and {STORE_VERSION})",
                       None, stat)
    if meta.get("shard_bytes") != str(size):
        return Verdict(f"made from {meta.get('shard_bytes')} bytes of {shard}, which now has {size}: the shard changed",
                       None, stat)
    if version == "1":
        # No hash to compare: the shard is taken as the one the store was made from when it has
        # that size and was not modified after the store was written (PT2's rewrite would be).
        if mtime_ns > os.stat(path).st_mtime_ns:
            return Verdict(f"store format 1 (no hash of the shard's bytes) and {shard} was modified after it was "
                           "written: the shard may have changed", None, stat)
        return Verdict(None, "store format 1 (no hash of the shard's bytes); the shard has its size and is not "
                       "newer than it", stat)
    same_stat = meta.get("shard_mtime_ns") == str(mtime_ns)
    if same_stat and not verify:
        return Verdict(None, None, stat)
    if meta.get("shard_blake2b") != shard_digest(shard):
        return Verdict(f"made from other contents of {shard} (same size, other bytes): the shard changed", None, stat)
    if same_stat:
        return Verdict(None, None, stat)
    return Verdict(None, "the shard has a new modification time and the same bytes" if "shard_mtime_ns" in meta
                   else "the shard's modification time was not recorded (same bytes)", stat)


def rewrite_store_metadata(path: str, shard: str, meta: dict, stat: Tuple[int, int]) -> bool:
    """Records the shard's size, mtime and hash in the store (format 2): a copy with the new
    header (tensor bytes copied as they are) renamed over it. False, writing nothing, when the
    shard changed since ``stat`` was taken (its hash would not be of the bytes judged)."""
    digest = shard_digest(shard)
    if shard_stat(shard) != tuple(stat):
        return False
    new = {**meta, "version": str(STORE_VERSION), "shard": os.path.abspath(shard), "shard_bytes": str(stat[0]),
           "shard_mtime_ns": str(stat[1]), "shard_blake2b": digest}
    tmp = temp_name(path)
    try:
        with open(path, "rb") as src:
            n = struct.unpack("<Q", src.read(8))[0]
            header = json.loads(src.read(n))
            header["__metadata__"] = new
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)   # the tensors stay 8-byte aligned, as safetensors writes them
            with open(tmp, "wb") as dst:
                dst.write(struct.pack("<Q", len(blob)) + blob)
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def targets_file(targets_dir: str, shard: str) -> str:
    digest = hashlib.blake2b(os.path.abspath(shard).encode(), digest_size=6).hexdigest()
    stem = os.path.basename(shard)
    stem = stem[:-4] if stem.endswith(".tar") else stem
    return os.path.join(targets_dir, f"{stem}-{digest}.safetensors")


def write_shard_targets(shard: str, targets_dir: str, encoders: TargetEncoders, batch_size: int,
                        report: Report, progress=None) -> int:
    """Runs the encoders over one shard's readable pairs (the order the shard holds them) and
    writes its store (temp name, then rename). Returns the number of rows."""
    from PIL import Image
    import io
    from safetensors.torch import save_file
    # Size, mtime and hash before reading: a shard rewritten meanwhile never matches its store.
    size, mtime_ns = shard_stat(shard)
    digest = shard_digest(shard)
    keys: List[str] = []
    image_rows, text_rows = [], []
    pending: List[tuple] = []

    def flush():
        if pending:
            pixels, ids = encoders.inputs([p[1] for p in pending], [p[2] for p in pending])
            e_v, e_t = encoders(pixels, ids)
            image_rows.append(e_v.cpu())
            text_rows.append(e_t.cpu())
            keys.extend(p[0] for p in pending)
            if progress is not None:
                progress.update(len(pending))
            pending.clear()

    for doc in read_wds_pairs(shard, report, strict=False):
        try:
            with Image.open(io.BytesIO(doc.images[0][1].data)) as im:
                image = im.convert("RGB")
        except Exception:
            report.skip("image unreadable", doc.source)
            continue
        pending.append((split_where(doc.source)[1], image, doc.sentences[0]))
        if len(pending) == batch_size:
            flush()
    flush()
    if not keys:   # nothing of it reaches training either: counted, no store written
        report.skip("shard without a readable pair", shard)
        return 0
    path = targets_file(targets_dir, shard)
    meta = {"version": str(STORE_VERSION), "shard": os.path.abspath(shard), "shard_bytes": str(size),
            "shard_mtime_ns": str(mtime_ns), "shard_blake2b": digest, "keys": json.dumps(keys), **encoders.sources}
    tmp = temp_name(path)
    save_file({"image": torch.cat(image_rows).contiguous(), "text": torch.cat(text_rows).contiguous()}, tmp,
              metadata=meta)
    os.replace(tmp, path)
    return len(keys)


def read_store_metadata(path: str) -> Optional[dict]:
    """The store's metadata; None when there is no store or it cannot be read (recomputed)."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as fh:
            return fh.metadata() or {}
    except Exception:
        return None


def bring_store_up_to_date(targets_dir: str, shard: str, log=print) -> bool:
    """Precompute's check: True when the shard's store is current (verified by hash, or a
    format-1 store by size and mtime); a current store whose metadata is out of date (format 1,
    or the shard's new mtime) gets the shard's size, mtime and hash recorded, with a note.
    False: the store is missing, damaged or stale (noted) and must be computed again."""
    path = targets_file(targets_dir, shard)
    meta = read_store_metadata(path)
    if meta is None:
        if os.path.isfile(path):
            log(f"note: {path} is unreadable; computing it again")
        return False
    verdict = judge_store(meta, shard, path, verify=True)
    if verdict.stale:
        log(f"note: {path} does not match {shard} as it is now ({verdict.stale}); computing it again")
        return False
    if verdict.rewrite:
        try:
            done = rewrite_store_metadata(path, shard, meta, verdict.stat)
        except OSError as exc:
            raise OutputError(f"{path}: cannot record the hash of {shard} in it ({exc.strerror or exc})") from None
        if not done:
            log(f"note: {shard} changed while it was hashed; computing {path} again")
            return False
        log(f"note: {path}: {verdict.rewrite}; recorded the shard's hash in it (no recompute)")
    return True


def store_is_current(targets_dir: str, shard: str) -> bool:
    """A store exists for this shard and was made from its current contents (checked by hash;
    a format-1 store by size and mtime). Writes nothing."""
    path = targets_file(targets_dir, shard)
    meta = read_store_metadata(path)
    return meta is not None and judge_store(meta, shard, path, verify=True).stale is None


class TargetStore:
    """Reads precomputed targets by pair ('shard:key'); keeps a few stores open."""

    def __init__(self, targets_dir: str, image_shape: Tuple[int, int], text_shape: Tuple[int, int],
                 sources: dict, log=print, keep_open: int = 4):
        if not os.path.isdir(targets_dir):
            raise FileNotFoundError(f"--targets-dir {targets_dir}: no such directory")
        self.dir, self.image_shape, self.text_shape = targets_dir, tuple(image_shape), tuple(text_shape)
        self.sources, self.log, self.keep_open = sources, log, keep_open
        self.open: "OrderedDict[str, tuple]" = OrderedDict()
        self.old_format_noted = False

    def _store(self, shard: str):
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        from safetensors import safe_open
        path = targets_file(self.dir, shard)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no precomputed targets for shard {shard}; run "
                                    f"tools/precompute_tokenizer_targets.py over it (or drop --targets-dir)")
        try:
            fh = safe_open(path, "pt")
            meta = fh.metadata() or {}
        except Exception as exc:
            raise InputError(f"{path}: unreadable precomputed targets ({type(exc).__name__}: {exc}); run "
                             f"tools/precompute_tokenizer_targets.py again (it recomputes it)") from None
        # Trusts the recorded size and mtime (no read of the shard) and writes nothing: the
        # targets directory may be shared or read-only; precompute is what updates stores.
        verdict = judge_store(meta, shard, path, verify=False)
        if verdict.stale:
            raise InputError(f"{path}: {verdict.stale}; run tools/precompute_tokenizer_targets.py over it again (it "
                             "recomputes changed shards), or drop --targets-dir")
        if meta.get("version") == "1" and not self.old_format_noted:
            self.old_format_noted = True
            self.log(f"note: {path} (and any other store of format 1 in {self.dir}) is used as its shard has the "
                     "recorded size and is not newer than the store; run tools/precompute_tokenizer_targets.py "
                     "once to record the shards' hashes (no recompute)")
        image, text = fh.get_slice("image"), fh.get_slice("text")
        if tuple(image.get_shape()[1:]) != self.image_shape or tuple(text.get_shape()[1:]) != self.text_shape:
            raise InputError(f"{path}: targets shaped {tuple(image.get_shape()[1:])} / {tuple(text.get_shape()[1:])}, "
                             f"the encoders give {self.image_shape} / {self.text_shape}: made with other encoders")
        for key, value in self.sources.items():
            if meta.get(key) != value:
                self.log(f"note: {path} was made with {key} {meta.get(key)}, this run names {value}")
        rows = {k: i for i, k in enumerate(json.loads(meta["keys"]))}
        self.open[shard] = (path, rows, image, text)
        while len(self.open) > self.keep_open:
            self.open.popitem(last=False)
        return self.open[shard]

    def __call__(self, wheres: Sequence[str]):
        e_v, e_t = [], []
        for where in wheres:
            shard, key = split_where(where)
            path, rows, image, text = self._store(shard)
            if key not in rows:
                raise InputError(f"{path}: no targets for sample {key} of {shard}; precompute the shard again")
            i = rows[key]
            e_v.append(image[i:i + 1])
            e_t.append(text[i:i + 1])
        return torch.cat(e_v), torch.cat(e_t)
