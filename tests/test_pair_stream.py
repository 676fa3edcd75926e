"""Stage 1's webdataset pair stream: per-rank shards, deterministic shuffle, blends, exact
resume by stream position, and bad pairs counted, never fatal."""

import io
import itertools
import tarfile

import numpy as np
import pytest

from megatron_vl.data.formats import Report
from megatron_vl.data.pair_stream import PairStream, expand_shards, parse_sources


def _jpeg(seed):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _shard(path, name, n, start, bad=()):
    """n pairs keyed {name}{i}; `bad` holds (i, kind) with kind in nocaption / cutimage / latin1."""
    bad = dict(bad)
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            files = {"jpg": _jpeg(i), "txt": f"caption {name}{i}".encode()}
            if bad.get(i) == "nocaption":
                del files["txt"]
            elif bad.get(i) == "cutimage":
                files["jpg"] = files["jpg"][:60]
            elif bad.get(i) == "latin1":
                files["txt"] = "caf\xe9".encode("latin-1")
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{name}{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    for s in range(4):
        _shard(d / f"a{s:05d}.tar", "a", 6, 6 * s,
               bad=[(1, "nocaption"), (2, "cutimage"), (3, "latin1")] if s == 0 else [])
    for s in range(2):
        _shard(d / f"b{s:05d}.tar", "b", 5, 5 * s)
    return d


def test_shards_blends_ranks_and_bad_pairs(shards):
    a = f"{shards}/a{{00000..00003}}.tar"
    assert expand_shards(a) == [f"{shards}/a{i:05d}.tar" for i in range(4)]
    sources, weights = parse_sources(["0.75", a, "0.25", f"{shards}/b{{00000..00001}}.tar"])
    assert weights == [0.75, 0.25] and len(sources[1]) == 2
    with pytest.raises(ValueError, match="expected one pattern, or weight/pattern pairs such as"):
        parse_sources(["0.5", a, "b.tar"])
    # Source a over 2 ranks: each rank reads 2 of the 4 shards in an epoch (at least 10 pairs
    # with a caption each), so the first 10 positions of the two ranks never share a pair.
    seen = []
    for rank in range(2):
        stream = PairStream([expand_shards(a)], [1.0], rank=rank, world=2, seed=3, shuffle_buffer=4)
        seen.append({p.caption for p in itertools.takewhile(lambda p: p.position < 10, stream.samples())})
    assert len(seen[0]) >= 9 and len(seen[1]) >= 9 and not seen[0] & seen[1]
    # Blend: over 40 positions, 30 from a and 10 from b (the weighted interleave is exact).
    counts = {"a": 0, "b": 0}
    for where, _, _ in itertools.islice(PairStream(sources, weights, seed=3)._blend(), 40):
        counts["b" if "/b0" in where else "a"] += 1
    assert counts == {"a": 30, "b": 10}
    # Bad pairs: counted with their place, the run goes on.
    report = Report()
    stream = PairStream([[f"{shards}/a00000.tar"]], [1.0], seed=3, shuffle_buffer=2, report=report)
    good = list(itertools.islice(stream.samples(), 3))
    assert len(good) == 3 and report.skipped["pair without caption or image"] >= 1
    assert report.skipped["invalid UTF-8"] >= 1 and report.skipped["image unreadable"] >= 1
    assert report.first_seen["image unreadable"] == f"{shards}/a00000.tar:a0002"
    with pytest.raises(ValueError, match="each rank needs at least one shard of every source"):
        PairStream(sources, weights, rank=0, world=3)


def test_order_is_deterministic_and_resume_is_exact(shards):
    sources, weights = parse_sources(["0.6", f"{shards}/a{{00000..00003}}.tar", "0.4", f"{shards}/b{{00000..00001}}.tar"])

    def stream():
        return PairStream(sources, weights, rank=1, world=2, seed=11, shuffle_buffer=3)

    straight = [(p.position, p.where, p.caption, np.asarray(p.image).tobytes())
                for p in itertools.islice(stream().samples(), 40)]   # several epochs of source b
    assert straight == [(p.position, p.where, p.caption, np.asarray(p.image).tobytes())
                        for p in itertools.islice(stream().samples(), 40)]
    cut = straight[16][0] + 1
    resumed = [(p.position, p.where, p.caption, np.asarray(p.image).tobytes())
               for p in itertools.islice(stream().samples(skip=cut), 23)]
    assert resumed == straight[17:40]
    # Another seed, another order (the shuffle is real).
    other = [p.where for p in itertools.islice(PairStream(sources, weights, rank=1, world=2, seed=12,
                                                          shuffle_buffer=3).samples(), 40)]
    assert other != [s[1] for s in straight]
