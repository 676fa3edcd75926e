"""The feature store's size on disk: one float16 [N, d] block per image of the image table,
N x d x 2 bytes (the .idx adds a 72-byte header and 8 bytes per undecodable image).

Three counts of images: the corpus as preprocessed in pack mode (every image is stored); the
paper's rule (at most k images per document, chosen at preprocessing: only those are stored
and extracted), which keeps at most min(images, k x documents); and what one training run can
read at all, iterations x global batch x images per sample, an upper bound on the distinct
images it sees (extracting more than that buys that run nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

TB = 10 ** 12
TiB = 2 ** 40


def bytes_per_image(num_tokens: int, dim: int) -> int:
    """N x d x 2: one float16 [N, d] block."""
    return num_tokens * dim * 2


@dataclass(frozen=True)
class CorpusStorage:
    """A corpus and a run, as counted for the store's size."""

    images: int
    """Images in the corpus, every image of every document (pack mode's image table)."""
    documents: Optional[int] = None
    """Its documents; with max_images_per_doc they bound what the paper's rule keeps."""
    max_images_per_doc: int = 5
    """The paper's rule: at most this many images chosen per document."""
    num_tokens: int = 32
    """N: visual embeddings per image."""
    dim: int = 4096
    """d: their width."""
    iterations: int = 0
    """Optimizer steps of the run (0: no run line)."""
    global_batch: int = 0
    """Samples per step."""
    images_per_sample: int = 5
    """Most image blocks in one sample."""

    @property
    def per_image(self) -> int:
        return bytes_per_image(self.num_tokens, self.dim)

    @property
    def paper_rule_images(self) -> Optional[int]:
        """The most images the paper's rule keeps: min(images, k x documents)."""
        return None if self.documents is None else min(self.images, self.max_images_per_doc * self.documents)

    @property
    def run_images(self) -> int:
        """The most images the run reads: iterations x global batch x images per sample."""
        return self.iterations * self.global_batch * self.images_per_sample


def storage_table(c: CorpusStorage) -> str:
    """The store's size per image and for each count (images, TB, TiB), one line each."""
    rows: List[tuple] = [("corpus, every image (pack mode)", c.images)]
    if c.paper_rule_images is not None:
        rows.append((f"corpus, <= {c.max_images_per_doc} per document (paper's rule), at most", c.paper_rule_images))
    if c.run_images:
        rows.append((f"a run of {c.iterations:,} iterations x {c.global_batch:,} samples x <= {c.images_per_sample} "
                     "images reads, at most", c.run_images))
    width = max(len(r[0]) for r in rows)
    lines = [f"feature store: float16 [{c.num_tokens}, {c.dim}] per image = {c.per_image:,} bytes (N x d x 2)",
             f"{'':<{width}} {'images':>14} {'TB':>9} {'TiB':>9}"]
    for label, images in rows:
        size = images * c.per_image
        lines.append(f"{label:<{width}} {images:>14,} {size / TB:>9.2f} {size / TiB:>9.2f}")
    return "\n".join(lines)
