"""Write a small corpus in the three real formats, with procedurally drawn images and captions
that describe them ("a red circle above a blue square"), plus a sentencepiece tokenizer
trained on its text: the whole pipeline runs with no downloads.

    python tools/make_sample_data.py --output sample_data [--documents 64 --pairs 256 --seed 0]

Writes: mmc4/docs_shard_0_v2.jsonl.zip + mmc4/images/, obelics/part-00000.parquet (image
bytes in the rows), pairs/00000.tar ... (img2dataset webdataset layout), text.jsonl,
instruction data (llava/llava_instruct.json + images, coco/dataset_coco.json + train2014/,
instructpix2pix/ and magicbrush/ parquet), tokenizer.model.
"""

import argparse
import io
import json
import os
import random
import sys
import zipfile

from megatron_vl.atomic import guard_output_files
from megatron_vl.errors import OutputError, UsageError, run_cli

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (140, 60, 170), "orange": (240, 140, 30)}
SHAPES = ["circle", "square", "triangle"]
RELATIONS = ["above", "below", "left of", "right of"]


def scene(rng: random.Random):
    """(first color, first shape, relation, second color, second shape)."""
    (c1, c2), (s1, s2) = rng.sample(list(COLORS), 2), (rng.choice(SHAPES), rng.choice(SHAPES))
    return c1, s1, rng.choice(RELATIONS), c2, s2


def draw(rng: random.Random, size: int = 64):
    """(PNG/JPEG-able PIL image, caption)."""
    return draw_scene(scene(rng), size)


def draw_scene(spec, size: int = 64):
    from PIL import Image, ImageDraw
    c1, s1, relation, c2, s2 = spec
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


def write_instruct(out: str, n: int, rng: random.Random):
    """Instruction data in the four real layouts (stage 3); returns their text for the tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = []
    # LLaVA json: two-turn conversations about an image, and a few text-only ones.
    os.makedirs(os.path.join(out, "llava", "images"), exist_ok=True)
    records = []
    for i in range(n):
        if i % 4 == 3:
            color = rng.choice(list(COLORS))
            conv = [{"from": "human", "value": f"Name a shape that could be {color}."},
                    {"from": "gpt", "value": f"A {color} {rng.choice(SHAPES)}."}]
            records.append({"id": f"text-{i}", "conversations": conv})
        else:
            spec = scene(rng)
            im, caption = draw_scene(spec)
            name = f"{i:05d}.jpg"
            with open(os.path.join(out, "llava", "images", name), "wb") as fh:
                fh.write(encode(im))
            conv = [{"from": "human", "value": "<image>\nWhat does the picture show?"},
                    {"from": "gpt", "value": f"It shows {caption}."},
                    {"from": "human", "value": f"What color is the {spec[1]}?"},
                    {"from": "gpt", "value": f"The {spec[1]} is {spec[0]}."}]
            records.append({"id": f"img-{i}", "image": name, "conversations": conv})
        texts += [t["value"].replace("<image>\n", "") for t in records[-1]["conversations"]]
    with open(os.path.join(out, "llava", "llava_instruct.json"), "w") as fh:
        json.dump(records, fh, indent=1)
    # COCO captions, Karpathy layout: five phrasings of each drawing's caption.
    os.makedirs(os.path.join(out, "coco", "train2014"), exist_ok=True)
    images = []
    for i in range(n):
        im, caption = draw(rng)
        name = f"COCO_train2014_{i:012d}.jpg"
        with open(os.path.join(out, "coco", "train2014", name), "wb") as fh:
            fh.write(encode(im))
        sentences = [f"{p}{caption}." for p in ("", "There is ", "A drawing of ", "Shown here: ", "We see ")]
        images.append({"filepath": "train2014", "filename": name, "cocoid": i, "imgid": i,
                       "split": "val" if i % 8 == 7 else "train",
                       "sentences": [{"raw": t, "tokens": t.lower().split()} for t in sentences]})
        texts += sentences
    with open(os.path.join(out, "coco", "dataset_coco.json"), "w") as fh:
        json.dump({"images": images, "dataset": "coco"}, fh)
    # InstructPix2Pix and MagicBrush parquet: recolour a shape.
    def edit(spec):
        new = rng.choice([c for c in COLORS if c not in (spec[0], spec[3])])
        return (new, *spec[1:]), f"make the {spec[1]} {new}"
    rows = {"original_image": [], "edit_prompt": [], "edited_image": []}
    for i in range(n):
        spec = scene(rng)
        edited, prompt = edit(spec)
        rows["original_image"].append({"bytes": encode(draw_scene(spec)[0], "PNG"), "path": f"{i}_0.png"})
        rows["edit_prompt"].append(prompt)
        rows["edited_image"].append({"bytes": encode(draw_scene(edited)[0], "PNG"), "path": f"{i}_1.png"})
        texts.append(prompt)
    os.makedirs(os.path.join(out, "instructpix2pix"), exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(out, "instructpix2pix", "train-00000.parquet"))
    rows = {"img_id": [], "turn_index": [], "source_img": [], "instruction": [], "target_img": []}
    for i in range(n):
        spec = scene(rng)
        for turn in (1, 2):
            edited, prompt = edit(spec)
            rows["img_id"].append(str(100000 + i))
            rows["turn_index"].append(turn)
            rows["source_img"].append({"bytes": encode(draw_scene(spec)[0], "PNG"), "path": None})
            rows["instruction"].append(prompt)
            rows["target_img"].append({"bytes": encode(draw_scene(edited)[0], "PNG"), "path": None})
            texts.append(prompt)
            spec = edited
    os.makedirs(os.path.join(out, "magicbrush"), exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(out, "magicbrush", "train-00000.parquet"))
    return texts


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
    p.add_argument("--output", default="sample_data",
                   help="folder to write into; refused when it already holds a file this run would write")
    p.add_argument("--documents", type=int, default=64, help="interleaved documents (MMC4 and OBELICS each)")
    p.add_argument("--pairs", type=int, default=256, help="image-caption pairs")
    p.add_argument("--pair-shards", type=int, default=1,
                   help="webdataset shards the pairs are split over (stage 1 needs one per rank at least)")
    p.add_argument("--instruct", type=int, default=16,
                   help="records per instruction format (LLaVA json, COCO Karpathy json, InstructPix2Pix and "
                        "MagicBrush parquet); 0 writes none")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier sample in --output (others there are left alone)")
    return p


def written_paths(args):
    """What main() writes under --output (image folders as a whole: their names are drawn),
    including the tokenizer trainer's scratch files, which it deletes afterwards."""
    paths = ["mmc4/docs_shard_0_v2.jsonl.zip", "mmc4/images", "obelics/part-00000.parquet", "text.jsonl",
             "tokenizer.model", "tokenizer.vocab", "tokenizer_corpus.txt"]
    paths += [f"pairs/{s:05d}.tar" for s in range(args.pair_shards)]
    if args.instruct:
        paths += ["llava/llava_instruct.json", "llava/images", "coco/dataset_coco.json", "coco/train2014",
                  "instructpix2pix/train-00000.parquet", "magicbrush/train-00000.parquet"]
    return paths


def check_args(args):
    errors = [f"{flag} {value}: must be at least {low}" for flag, value, low in (
        ("--documents", args.documents, 1), ("--pairs", args.pairs, 0), ("--pair-shards", args.pair_shards, 1),
        ("--instruct", args.instruct, 0), ("--vocab-size", args.vocab_size, 16)) if value < low]
    if errors:
        raise UsageError("; ".join(errors))
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise OutputError(f"--output {args.output} is a file, not a folder")
    # A folder holding a user's tokenizer.model (or an earlier sample) is not written over silently.
    guard_output_files(args.output, written_paths(args), overwrite=args.overwrite)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(args)
    rng = random.Random(args.seed)
    os.makedirs(args.output, exist_ok=True)
    mmc4_docs = [interleaved_document(rng) for _ in range(args.documents)]
    obelics_docs = [interleaved_document(rng) for _ in range(args.documents)]
    write_mmc4(args.output, mmc4_docs, rng)
    write_obelics(args.output, obelics_docs)
    captions = write_pairs(args.output, args.pairs, rng, args.pair_shards)
    # (the tokenizer is trained on the pretraining text only, as before the instruction data existed)
    if args.instruct:
        write_instruct(args.output, args.instruct, random.Random(args.seed + 1))
    sentences = [s for d in mmc4_docs + obelics_docs for s, _ in d] + captions
    with open(os.path.join(args.output, "text.jsonl"), "w") as fh:
        for d in mmc4_docs:
            fh.write(json.dumps({"text": " ".join(s for s, _ in d)}) + "\n")
    train_tokenizer(args.output, sentences, args.vocab_size)
    stale = sorted(set(os.listdir(os.path.join(args.output, "pairs")))
                   - {f"{s:05d}.tar" for s in range(args.pair_shards)})
    if stale:   # an earlier sample's extra shards: a `pairs/*.tar` glob would read them too
        print(f"note: {args.output}/pairs also holds {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''}, "
              "which this run did not write", file=sys.stderr)
    n_images = sum(im is not None for d in mmc4_docs + obelics_docs for _, im in d) + args.pairs
    print(f"wrote {args.output}/: {args.documents} MMC4 + {args.documents} OBELICS documents, {args.pairs} pairs, "
          f"{n_images} images, tokenizer.model")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
