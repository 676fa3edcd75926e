"""Peak memory of text-to-image evaluation at two image counts: the runner's streaming FID
statistics (eval/runner.text_to_image: each batch's features into float64 sums, the batch
dropped) against keeping every real and generated image and computing FID from the stacked
tensors (what the runner did before). Goal: streaming flat in the number of images (ratio ~1.0).

    python benchmarks/bench_eval_memory.py                      # 64 vs 512 images, 299 px, 2048 features
    python benchmarks/bench_eval_memory.py --smoke              # same code path, tiny sizes (the test-suite's check)

Memory = resident set (RSS): the peak (Linux VmHWM, reset through /proc/self/clear_refs before
each measurement; where that is refused, psutil's RSS sampled every millisecond) minus the RSS
when the measurement starts, after freed heap is handed back to the OS (glibc malloc_trim). The
larger count runs first, so memory an earlier run left mapped can only flatter the smaller one
(and so raise the ratio). No model: a stand-in generator draws each caption's picture and a
stand-in extractor gives 2048-wide features (Inception's width; testing/stand_in_t2i.py), so the
figures are the statistics' and the images', not a network's (a real Inception or CLIP adds
its weights once, whatever the count).
"""

import argparse
import ctypes
import gc
import tempfile
import threading
import time

from megatron_vl.testing.bench import add_smoke_flag, parse_with_smoke

MB = 1024 * 1024
SMOKE = {"counts": [8, 16], "size": 32, "width": 64, "batch": 4}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _hwm_resettable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: freed heap may stay resident (flatters later runs)
        pass


def peak_rss_delta(fn, use_hwm: bool) -> float:
    """MB: the most resident memory while fn() runs, above the resident memory before it."""
    _trim_heap()
    if use_hwm:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")            # VmHWM := VmRSS
        before = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    import psutil
    process = psutil.Process()
    before = process.memory_info().rss
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], process.memory_info().rss) - before) / MB


def streaming(items, args):
    """The runner's path: statistics updated per batch, nothing kept."""
    from megatron_vl.eval.runner import text_to_image
    from megatron_vl.eval.settings import EvalSettings
    from megatron_vl.testing.stand_in_t2i import PooledFeatures, StandInGenerator
    settings = EvalSettings(batch_size=args.batch, options={"fid_feature": PooledFeatures(args.width),
                                                             "t2i_size": args.size})
    return text_to_image(StandInGenerator(), "t2i", items, settings, 0, 1)["FID"]


def kept_and_stacked(items, args):
    """The former path: every real and generated image kept, FID from the stacked tensors."""
    import numpy as np
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from megatron_vl.eval.runner import _image
    from megatron_vl.testing.stand_in_t2i import PooledFeatures, caption_picture
    real, fake = [], []
    for start in range(0, len(items), args.batch):
        for item in items[start:start + args.batch]:
            picture = caption_picture(item.question, args.size, args.size)
            real.append(torch.from_numpy(np.array(_image(item.image).resize(picture.size))).permute(2, 0, 1))
            fake.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    metric = FrechetInceptionDistance(feature=PooledFeatures(args.width), sync_on_compute=False)
    metric.update(torch.stack(real), real=True)
    metric.update(torch.stack(fake), real=False)
    return float(metric.compute())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs=2, default=[64, 512], metavar=("SMALL", "LARGE"),
                   help="the two image counts compared")
    p.add_argument("--size", type=int, default=299, help="image side in pixels (Inception's input: 299)")
    p.add_argument("--width", type=int, default=2048, help="FID feature width (Inception's pool features: 2048)")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    add_smoke_flag(p, SMOKE)
    args = parse_with_smoke(p, argv, SMOKE)
    from megatron_vl.testing.stand_in_t2i import caption_items, write_real_images
    small, large = sorted(args.counts)
    use_hwm = _hwm_resettable()
    with tempfile.TemporaryDirectory() as tmp:
        items = caption_items(write_real_images(tmp, 8, args.size), large)
        for path in (streaming, kept_and_stacked):   # warm-up: imports, first decodes, allocator pools
            path(items[:args.batch], args)
        peaks, fids = {}, {}
        for n in (large, small):
            for name, path in (("streaming", streaming), ("kept", kept_and_stacked)):
                peaks[name, n] = peak_rss_delta(lambda: fids.__setitem__((name, n), path(items[:n], args)), use_hwm)
    how = ("RSS: VmHWM reset via /proc/self/clear_refs" if use_hwm else "RSS: psutil sampled every 1 ms")
    sums_mb = 2 * (args.width ** 2 + args.width + 1) * 8 / MB
    image_mb = 3 * args.size * args.size / MB
    print(f"peak memory above the start ({how}); {args.size}x{args.size} images, {args.width}-wide features, "
          f"batches of {args.batch}")
    print("images | streaming statistics | every image kept, stacked")
    for n in (small, large):
        print(f"{n:6d} | {peaks['streaming', n]:17.1f} MB | {peaks['kept', n]:18.1f} MB")
    ratio = peaks["streaming", large] / max(peaks["streaming", small], 1e-9)
    kept_ratio = peaks["kept", large] / max(peaks["kept", small], 1e-9)
    print(f"ratio {large}/{small} images: streaming {ratio:.2f} (goal ~1.0: flat), kept {kept_ratio:.2f} "
          f"(images x {large / small:.0f})")
    slope = {name: (peaks[name, large] - peaks[name, small]) / (large - small) * 1024 for name in ("streaming", "kept")}
    print(f"growth per image: streaming {slope['streaming']:.0f} KB, kept {slope['kept']:.0f} KB")
    print(f"for scale: the float64 sums (real + generated) {sums_mb:.1f} MB; one real + generated image pair "
          f"{2 * image_mb:.2f} MB, x {large} = {2 * image_mb * large:.1f} MB")
    print(f"FID, streaming vs stacked: {fids['streaming', large]:.6f} vs {fids['kept', large]:.6f} ({large} images)")


if __name__ == "__main__":
    main()
