"""Title keywords -> per-image tag ids (the weak labels of tag pretraining).

WeChat AI's WT-Set ("Rethinking Model Pretraining for Noisy Image Classification", Yan, Niu, Zhou,
GLD2019) turns each web image's title into multi-label targets: keywords of the title, with the most
and the least common words removed (~35k keywords, ~5 per image). GLDv2's `train_attribution.csv`
(id,url,author,license,title) holds the Wikimedia file title of every train image.

Deviation: the seed keeps nouns and adjectives (a part-of-speech tagger); here a keyword is any
letter run of 2+ characters that is not a stop word (English function words and camera/file-name
tokens), lower-cased, digits dropped; words in fewer than `min_df` titles or more than a `max_df`
share of them are removed (sklearn's CountVectorizer min_df/max_df semantics). No tagger is
installed and the document-frequency cut removes most function words anyway.

Two streaming passes over the CSV (GLDv2: 4.1M rows): count document frequencies (memory: one
counter entry per distinct word), then map titles to tag ids into compact arrays (16-byte ids,
int32 tags: ~200 MB at GLDv2 size), looked up per planned example with one vectorised search.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import re
from array import array
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from landmark_tf import fileio
from landmark_tf.errors import UserError

TAG_VOCAB = "tag_vocab.csv"
_WORD_RE = re.compile(r"[^\W\d_]{2,}")  # letter runs (any script), digits and "_" split words
_EXTENSION_RE = re.compile(r"\.(jpe?g|png|gif|tiff?|svg|webp)$", re.IGNORECASE)
# English, and common European, function words; camera and file-name tokens.
STOP_WORDS = frozenset([
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "has", "in", "into", "is",
    "it", "its", "of", "on", "or", "that", "the", "this", "to", "was", "were", "with", "de",
    "del", "der", "des", "die", "du", "el", "en", "et", "la", "le", "les", "los", "und", "van",
    "von", "file", "jpg", "jpeg", "png", "gif", "tif", "tiff", "svg", "img", "dsc", "dscn",
    "dscf", "imgp", "pict", "pic", "sam", "dcim", "cimg", "p", "mvc",
])
_CHUNK = 1 << 16


def keywords(title: str) -> list[str]:
    """The distinct keywords of one title, in order: 'File:Red Dome 2009.jpg' -> ['red', 'dome']."""
    if title.startswith("File:"):
        title = title[5:]
    words = _WORD_RE.findall(_EXTENSION_RE.sub("", title).lower())
    return [w for w in dict.fromkeys(words) if w not in STOP_WORDS]


def read_titles(path: str) -> Iterator[tuple[str, str]]:
    """Streams (id, title) from an attribution CSV with `id` and `title` columns (GLDv2's
    train_attribution.csv); UserError for a missing file or header."""
    if not fileio.exists(path):
        raise UserError(f"--attribution_csv {path}: no such file")
    with tf.io.gfile.GFile(path, "rb") as raw:
        reader = csv.reader(line.decode("utf-8", errors="replace") for line in raw)
        header = next(reader, [])
        if "id" not in header or "title" not in header:
            raise UserError(f"{path}:1: an attribution CSV needs id and title columns "
                            f"(GLDv2 train_attribution.csv), got {','.join(header)!r}")
        i_id, i_title, width = header.index("id"), header.index("title"), len(header)
        for line, row in enumerate(reader, start=2):
            if len(row) != width:
                raise UserError(f"{path}:{line}: {len(row)} fields, the header has {width}")
            yield row[i_id], row[i_title]


def document_frequency(path: str) -> tuple[collections.Counter, int]:
    """Pass 1: word -> number of titles holding it, and the number of titles."""
    counts: collections.Counter = collections.Counter()
    n = 0
    for _, title in read_titles(path):
        counts.update(keywords(title))
        n += 1
    return counts, n


def vocabulary(counts: collections.Counter, num_titles: int, min_df: int,
               max_df: float) -> list[tuple[str, int]]:
    """(tag, document frequency) of the kept words, most frequent first (ties by word): the
    position is the tag id. Keeps min_df <= df <= max_df * num_titles."""
    if min_df < 1 or not 0 < max_df <= 1:
        raise UserError(f"need --tag_min_df >= 1 and 0 < --tag_max_df <= 1, got {min_df}, {max_df}")
    top = max_df * num_titles
    kept = [(w, n) for w, n in counts.items() if min_df <= n <= top]
    return sorted(kept, key=lambda wn: (-wn[1], wn[0]))


class TagTable:
    """Tag ids of every attribution row: `ids` bytes [N] sorted, CSR `offsets` int64 [N+1] into
    `values` int32 [T]."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, values: np.ndarray):
        self.ids, self.offsets, self.values = ids, offsets, values

    @classmethod
    def from_csv(cls, path: str, vocab: list[tuple[str, int]]) -> TagTable:
        """Pass 2: maps every title to its tag ids (in title order), ids sorted afterwards.
        UserError for an id given twice."""
        tag_id = {w: i for i, (w, _) in enumerate(vocab)}
        id_chunks, pending, lengths, values = [], [], array("q"), array("i")
        for image_id, title in read_titles(path):
            tags = [tag_id[w] for w in keywords(title) if w in tag_id]
            pending.append(image_id.encode())
            lengths.append(len(tags))
            values.extend(tags)
            if len(pending) == _CHUNK:
                id_chunks.append(np.array(pending, dtype=bytes))
                pending = []
        id_chunks.append(np.array(pending, dtype=bytes))
        ids = np.concatenate(id_chunks) if id_chunks else np.array([], dtype=bytes)
        lengths_np = np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths_np)])
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        dup = np.flatnonzero(ids[1:] == ids[:-1])
        if dup.size:
            raise UserError(f"{path}: image id {ids[dup[0]].decode()} is listed more than once")
        vals = np.frombuffer(values, dtype=np.int32) if values else np.zeros(0, np.int32)
        # Reorder the CSR rows into id order without a Python loop over rows.
        lens = lengths_np[order]
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        gather = np.repeat(starts[:-1][order] - offsets[:-1], lens) + np.arange(offsets[-1])
        return cls(ids, offsets, vals[gather].astype(np.int32))

    def lookup(self, image_ids: list[str]) -> list[bytes | None]:
        """Per id: its tag ids as little-endian int32 bytes (b"" for a title without a kept
        word), or None when the id has no attribution row."""
        if not image_ids:
            return []
        query = np.array([i.encode() for i in image_ids], dtype=bytes)
        pos = np.clip(np.searchsorted(self.ids, query), 0, max(len(self.ids) - 1, 0))
        found = (self.ids[pos] == query) if len(self.ids) else np.zeros(len(query), bool)
        raw = self.values.astype("<i4")
        return [raw[self.offsets[p]:self.offsets[p + 1]].tobytes() if f else None
                for p, f in zip(pos.tolist(), found.tolist(), strict=True)]


def vocab_csv(vocab: list[tuple[str, int]]) -> str:
    """Text of tag_vocab.csv: tag_id,tag,document_frequency."""
    lines = ["tag_id,tag,document_frequency"]
    lines += [f"{i},{w},{n}" for i, (w, n) in enumerate(vocab)]
    return "\n".join(lines) + "\n"


def vocab_sha256(vocab: list[tuple[str, int]]) -> str:
    return hashlib.sha256(vocab_csv(vocab).encode()).hexdigest()
