"""Write a small corpus in the three real formats, with procedurally drawn images and captions
that describe them ("a red circle above a blue square"), plus a sentencepiece tokenizer
trained on its text: the whole pipeline runs with no downloads.

    python tools/make_sample_data.py --output sample_data [--documents 64 --pairs 256 --seed 0]

Writes: mmc4/docs_shard_0_v2.jsonl.zip + mmc4/images/, obelics/part-00000.parquet (image
bytes in the rows), pairs/00000.tar ... (img2dataset webdataset layout), text.jsonl,
tokenizer.model.
"""

import argparse
import io
import json
import os
import random
import sys
import zipfile

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["above", "below", "left of", "right of"]


def draw(rng: random.Random, size: int = 64):
    """(PNG/JPEG-able PIL image, caption)."""
    from PIL import Image, ImageDraw
    (c1, c2), (s1, s2) = rng.sample(list(COLORS), 2), (rng.choice(SHAPES), rng.choice(SHAPES))
    relation = rng.choice(RELATIONS)
    im = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(im)
    q = size // 4
    first, second = {"above": ((2 * q, q), (2 * q, 3 * q)), "below": ((2 * q, 3 * q), (2 * q, q)),
                     "left of": ((q, 2 * q), (3 * q, 2 * q)), "right of": ((3 * q, 2 * q), (q, 2 * q))}[relation]
    for (cx, cy), shape, color in ((first, s1, c1), (second, s2, c2)):
        box = [cx - q + 3, cy - q + 3, cx + q - 3, cy + q - 3]
        if shape == "circle":
            d.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            d.rectangle(box, fill=COLORS[color])
        else:
            d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[color])
    return im, f"a {c1} {s1} {relation} a {c2} {s2}"


def encode(im, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=90)
    return buf.getvalue()


FILLER = ["Here is another picture from the collection.", "The colors are bright and simple.",
          "Shapes like these are easy to describe.", "This page shows a few drawings.",
          "Look closely at where each shape sits."]


def interleaved_document(rng: random.Random):
    """[(sentence, image-or-None)]: 3-8 sentences, 1-4 of them described by an image."""
    n = rng.randint(3, 8)
    items = [(rng.choice(FILLER), None) for _ in range(n)]
    for i in rng.sample(range(n), rng.randint(1, min(4, n))):
        im, caption = draw(rng)
        items[i] = (f"The picture shows {caption}.", im)
    return items


def write_mmc4(out: str, docs, rng: random.Random):
    img_dir = os.path.join(out, "mmc4", "images")
    os.makedirs(img_dir, exist_ok=True)
    lines = []
    for d, items in enumerate(docs):
        info = []
        for i, (_, im) in enumerate(items):
            if im is not None:
                name = f"{d:05d}_{i:02d}.jpg"
                im.save(os.path.join(img_dir, name), quality=90)
                info.append({"image_name": name, "raw_url": f"http://example.invalid/{name}",
                             "matched_text_index": i, "matched_sim": round(rng.uniform(0.25, 0.4), 4)})
        sims = [[round(rng.uniform(0.1, 0.3), 4) for _ in items] for _ in info]
        for row, im_info in zip(sims, info):
            row[im_info["matched_text_index"]] = im_info["matched_sim"]
        lines.append(json.dumps({"url": f"http://example.invalid/doc{d}", "text_list": [s for s, _ in items],
                                 "image_info": info, "similarity_matrix": sims}))
    path = os.path.join(out, "mmc4", "docs_shard_0_v2.jsonl.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("docs_shard_0_v2.jsonl", "\n".join(lines) + "\n")


def write_obelics(out: str, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(out, "obelics"), exist_ok=True)
    texts, images, metadata = [], [], []
    for items in docs:
        t, im_col = [], []
        for sentence, im in items:
            if im is not None:           # OBELICS: the image stands at its own position
                t.append(None)
                im_col.append(encode(im))
            t.append(sentence)
            im_col.append(None)
        texts.append(t)
        images.append(im_col)
        metadata.append(json.dumps([None] * len(t)))
    table = pa.table({"texts": pa.array(texts, pa.list_(pa.string())),
                      "images": pa.array(images, pa.list_(pa.binary())),
                      "metadata": pa.array(metadata), "general_metadata": pa.array(["{}"] * len(docs))})
    pq.write_table(table, os.path.join(out, "obelics", "part-00000.parquet"))


def write_pairs(out: str, n: int, rng: random.Random, shards: int = 1):
    """n pairs over `shards` tars (pairs/00000.tar, ...), keys numbered across them."""
    import webdataset as wds
    os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
    captions = []
    per_shard = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(os.path.join(out, "pairs", f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                im, caption = draw(rng)
                captions.append(caption)
                sink.write({"__key__": f"{i:09d}", "jpg": encode(im), "txt": caption,
                            "json": {"key": f"{i:09d}", "caption": caption, "width": im.width, "height": im.height}})
    return captions


def train_tokenizer(out: str, text_lines, vocab_size: int):
    import sentencepiece as spm
    corpus = os.path.join(out, "tokenizer_corpus.txt")
    with open(corpus, "w") as fh:
        fh.write("\n".join(text_lines))
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=os.path.join(out, "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, hard_vocab_limit=False)
    os.remove(corpus)
    os.remove(os.path.join(out, "tokenizer.vocab"))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="sample_data")
    p.add_argument("--documents", type=int, default=64, help="interleaved documents (MMC4 and OBELICS each)")
    p.add_argument("--pairs", type=int, default=256, help="image-caption pairs")
    p.add_argument("--pair-shards", type=int, default=1,
                   help="webdataset shards the pairs are split over (stage 1 needs one per rank at least)")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    os.makedirs(args.output, exist_ok=True)
    mmc4_docs = [interleaved_document(rng) for _ in range(args.documents)]
    obelics_docs = [interleaved_document(rng) for _ in range(args.documents)]
    write_mmc4(args.output, mmc4_docs, rng)
    write_obelics(args.output, obelics_docs)
    captions = write_pairs(args.output, args.pairs, rng, args.pair_shards)
    sentences = [s for d in mmc4_docs + obelics_docs for s, _ in d] + captions
    with open(os.path.join(args.output, "text.jsonl"), "w") as fh:
        for d in mmc4_docs:
            fh.write(json.dumps({"text": " ".join(s for s, _ in d)}) + "\n")
    train_tokenizer(args.output, sentences, args.vocab_size)
    n_images = sum(im is not None for d in mmc4_docs + obelics_docs for _, im in d) + args.pairs
    print(f"wrote {args.output}/: {args.documents} MMC4 + {args.documents} OBELICS documents, {args.pairs} pairs, "
          f"{n_images} images, tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
