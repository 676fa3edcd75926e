"""Text-to-image FID and CLIP score stream: statistics updated batch by batch and summed across
ranks give, on 2 gloo ranks, the 1-rank figures on the same images, and the streamed FID is the
FID of the stacked features by the reference formulas (torchmetrics', scipy's sqrtm).

Tolerances, and why not bit for bit: the sums are float64 and added in another order on 2
ranks (two partial sums, then the all_reduce) than on 1; the covariance subtracts n·mu·muᵀ and
FID takes square roots of eigenvalues, which leaves ~1e-14 relative here (measured 7e-15), so
FID is held to rel=1e-11. The stand-in features are float64 (a float32 extractor differs by
batch shape at ~1e-7, which FID would carry at ~3e-8 relative). The CLIP cosines come from a
float32 model run on batches composed differently (measured 4e-9 relative): rel=1e-7."""

import os

import numpy as np
import pytest
import torch

from megatron_vl.testing.distributed import run_distributed
from megatron_vl.testing.stand_in_t2i import (PooledFeatures, StandInGenerator, caption_items, caption_picture,
                                              write_real_images)

pytestmark = pytest.mark.slow   # one 2-process spawn with transformers' CLIP in each (~10 s on 2 cores)

WIDTH = 6       # FID feature width: well under the 23 images' degrees of freedom (full-rank covariances)
IMAGES = 24
BATCH = 5       # uneven: 24 = 4 x 5 + 4 on one rank; 12 = 2 x 5 + 2 on each of two
ITEMS = 11      # runner: 6 items on rank 0, 5 on rank 1, batches of 3


def _images():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (IMAGES, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = torch.clamp(real.int() + torch.randint(-30, 60, real.shape, generator=g), 0, 255).to(torch.uint8)
    return real, fake, [f"a drawing of {n} shapes" for n in range(IMAGES)]


def _streamed(indices, group, clip_dir):
    from megatron_vl.eval import metrics
    real, fake, captions = _images()
    fid, clip = metrics.StreamingFID(feature=PooledFeatures(WIDTH)), metrics.StreamingClipScore(clip_dir)
    for start in range(0, len(indices), BATCH):
        batch = indices[start:start + BATCH]
        fid.update(real[batch], real=True)
        fid.update(fake[batch], real=False)
        clip.update(fake[batch], [captions[i] for i in batch])
    r, f = fid.reduced(group)
    return {"FID": metrics.frechet_distance(r, f), "CLIP": clip.compute(group), "counts": (r.count, f.count)}


def _stacked_references():
    """FID of the stacked tensors: torchmetrics' metric, and the textbook formula with scipy's sqrtm."""
    from scipy import linalg
    from torchmetrics.image.fid import FrechetInceptionDistance
    real, fake, _ = _images()
    # sync_on_compute: torchmetrics would otherwise gather from every rank of the default group (rank 0 alone here)
    metric = FrechetInceptionDistance(feature=PooledFeatures(WIDTH), sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    a, b = (PooledFeatures(WIDTH)(x).double().numpy() for x in (real, fake))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    scipy_fid = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b).real))
    return {"torchmetrics": float(metric.compute()), "scipy": float(scipy_fid)}


def _on_each_rank(rank, world, clip_dir, image_dir, out_dir):
    import torch.distributed as dist
    from megatron_vl.errors import UsageError
    from megatron_vl.eval.runner import text_to_image
    from megatron_vl.eval.settings import EvalSettings
    group = dist.group.WORLD
    everything = list(range(IMAGES))
    out = {"one": _streamed(everything, None, clip_dir),
           "two": _streamed(everything[rank::world], group, clip_dir),
           # rank 1 saw no image: it still takes part, with zeros of rank 0's feature width
           "lopsided": _streamed(everything if rank == 0 else [], group, clip_dir)}
    if rank == 0:
        out["stacked"] = _stacked_references()
    # The runner on the stand-in generator: one rank alone, then both ranks over the group.
    items = caption_items(sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir)), ITEMS)

    def settings(**extra):
        return EvalSettings(batch_size=3, options=dict(fid_feature=PooledFeatures(WIDTH), clip_score_model=clip_dir,
                                                       t2i_size=16, **extra))
    out["runner one"] = text_to_image(StandInGenerator(), "t2i", items, settings(), 0, 1)
    out["runner two"] = text_to_image(StandInGenerator(), "t2i", items, settings(generated_images_dir=out_dir),
                                      rank, world, group=group)
    try:
        text_to_image(StandInGenerator(), "t2i", items, settings(), rank, 3, group=group)
    except UsageError as exc:
        out["mismatch"] = str(exc)
    return out


def test_two_ranks_stream_the_one_rank_fid_and_clip_score(tmp_path):
    from test_eval import save_tiny_clip_model
    clip_dir = save_tiny_clip_model(tmp_path / "clip")
    write_real_images(str(tmp_path / "real"), ITEMS)   # one each: the real covariance is full rank
    r0, r1 = run_distributed(_on_each_rank, 2, clip_dir, str(tmp_path / "real"), str(tmp_path / "generated"),
                             timeout=180)
    one = r0["one"]
    assert r1["one"] == one and one["counts"] == (IMAGES, IMAGES)
    # The streamed FID is the stacked features' FID by either reference formula.
    assert one["FID"] == pytest.approx(r0["stacked"]["scipy"], rel=1e-11)
    assert one["FID"] == pytest.approx(r0["stacked"]["torchmetrics"], rel=1e-11)
    for split in ("two", "lopsided"):
        assert r0[split] == r1[split], split          # every rank holds the reduced figures
        assert r0[split]["counts"] == (IMAGES, IMAGES)
        assert r0[split]["FID"] == pytest.approx(one["FID"], rel=1e-11), split
        assert r0[split]["CLIP"] == pytest.approx(one["CLIP"], rel=1e-7), split
    # Through the runner: 2 ranks give the 1-rank figures, and wrote every generated picture.
    alone, shared = r0["runner one"], r0["runner two"]
    assert r1["runner two"] == shared and alone["count"] == shared["count"] == ITEMS
    assert shared["FID"] == pytest.approx(alone["FID"], rel=1e-11)
    assert shared["CLIP score"] == pytest.approx(alone["CLIP score"], rel=1e-7)
    assert sorted(os.listdir(tmp_path / "generated")) == sorted(f"{i}.png" for i in range(ITEMS))
    from PIL import Image
    for i in (0, ITEMS - 1):   # one of each rank's
        written = np.asarray(Image.open(tmp_path / "generated" / f"{i}.png"))
        assert np.array_equal(written, np.asarray(caption_picture(f"picture number {i}", 16, 16)))
    assert r0["mismatch"] == ("evaluation rank 0 of 3, but this process is rank 0 of 2 in the process group "
                              "passed in")
    assert r1["mismatch"] == ("evaluation rank 1 of 3, but this process is rank 1 of 2 in the process group "
                              "passed in")
