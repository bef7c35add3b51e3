"""Token-aware chunking: windows of token ids with overlap, and the text each one covers.

The chunker tokenizes once and hands the token ids on, so the embed actor never sees a
string. A window holds at most `max_tokens` ids including the model's special tokens and
the document prefix; the first window of a document is exactly what sentence-transformers
would embed after truncation, so short documents get identical vectors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from operators.tokens import TokenEngine, load_token_engine
from schemas.kinds import ChunkMode
from schemas.records import CONTENT_HASH_BYTES, DOC_HASH_COLUMN, chunk_schema, hash_document


def window_spans(n_tokens: int, *, window: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) token spans covering `n_tokens` in the fewest windows, evenly sized.

    Balanced windows keep the overlap at `overlap` tokens instead of end-aligning a last,
    mostly repeated window, and avoid a tiny tail chunk that would embed poorly.

    >>> window_spans(10, window=4, overlap=1)
    [(0, 4), (3, 7), (6, 10)]
    >>> window_spans(300, window=254, overlap=32)
    [(0, 166), (134, 300)]
    >>> window_spans(3, window=4, overlap=1)
    [(0, 3)]
    """
    if window <= overlap:
        raise ValueError(f"window ({window}) must be larger than overlap ({overlap})")
    if n_tokens <= window:
        return [(0, n_tokens)]
    count = math.ceil((n_tokens - overlap) / (window - overlap))
    total = n_tokens + (count - 1) * overlap  # tokens embedded, overlaps counted twice
    spans, start = [], 0
    for i in range(count):
        size = total // count + (1 if i < total % count else 0)  # <= window
        spans.append((start, start + size))
        start += size - overlap
    return spans


def content_hash(text: str, *, config_fingerprint: str) -> bytes:
    """Changes when a chunk's text or anything that shapes its vector changes."""
    h = hashlib.blake2b(digest_size=CONTENT_HASH_BYTES)
    h.update(config_fingerprint.encode())
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()


def document_hashes(docs: pa.Table, *, metadata_names: Sequence[str]) -> pa.Array:
    """`doc_hash` of documents that came without one (a table made by hand, not read by
    `read_shards`), from their typed metadata values.

    >>> d = pa.table({"doc_id": ["a", "b"], "text": ["x", "x"], "year": [1, None]})
    >>> h = document_hashes(d, metadata_names=["year"])
    >>> h.type, h[0] != h[1]
    (FixedSizeBinaryType(fixed_size_binary[16]), True)
    >>> h[1] == document_hashes(d.drop_columns(["year"]), metadata_names=[])[1]
    True
    """
    columns = {n: docs.column(n).to_pylist() for n in metadata_names}
    return pa.array([hash_document(doc_id, text, {n: v[row] for n, v in columns.items()})
                     for row, (doc_id, text) in enumerate(zip(
                         docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(),
                         strict=True))], pa.binary(CONTENT_HASH_BYTES))


def special_tokens(tokenizer: TokenEngine) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] … [SEP], … </s>).

    Found by encoding a probe with and without specials, which works for any fast
    tokenizer without relying on per-class helpers.
    """
    probe = "quiver"
    bare, full = tokenizer.ids(probe, specials=False), tokenizer.ids(probe, specials=True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return list(full[:i]), list(full[i + len(bare) :])
    raise ValueError("cannot locate the text inside the tokenizer's special-token template")


class Chunker:
    """Split documents into token windows and attach the model's input ids.

    Args:
        model_path: Local model folder whose tokenizer defines the tokens.
        max_tokens: Window size including special tokens and the document prefix.
        overlap: Tokens shared by neighbouring windows.
        document_prefix: Text the model expects before each document (may be empty).
        metadata: Schema of the pass-through columns.
        config_fingerprint: Embedding configuration folded into each content hash.
        mode: 'windows' covers the whole text; 'truncate' keeps the first window only.
    """

    def __init__(self, model_path: str, *, max_tokens: int, overlap: int,
                 document_prefix: str, metadata: pa.Schema, config_fingerprint: str,
                 mode: ChunkMode = "windows", trust_remote_code: bool = False) -> None:
        self._tok = load_token_engine(model_path, trust_remote_code)
        prefix_ids = self._tok.ids(document_prefix, specials=False) if document_prefix else []
        self._prefix_ids: list[int] = list(prefix_ids)
        self._head, self._tail = special_tokens(self._tok)
        n_special = len(self._head) + len(self._tail)
        self._window = max_tokens - n_special - len(self._prefix_ids)
        if self._window <= overlap:
            raise ValueError(
                f"chunk window of {max_tokens} tokens leaves {self._window} for text after "
                f"{n_special} special and {len(self._prefix_ids)} prefix tokens; "
                f"that must exceed the overlap ({overlap})"
            )
        self._overlap = overlap
        self._truncate = mode == "truncate"
        self._schema = chunk_schema(metadata)
        self._metadata_names = metadata.names
        self._fingerprint = config_fingerprint

    def _with_specials(self, ids: list[int]) -> list[int]:
        return [*self._head, *self._prefix_ids, *ids, *self._tail]

    def __call__(self, docs: pa.Table) -> pa.Table:
        if docs.num_rows == 0:
            return self._schema.empty_table()
        texts = docs.column("text").to_pylist()
        encoded_ids, encoded_offsets = self._tok.encode_batch(texts)
        out: dict[str, list] = {n: [] for n in ("id", "doc_id", "chunk", "text",
                                                 "content_hash", "input_ids",
                                                 "_truncated_tokens")}
        take: list[int] = []
        doc_ids = docs.column("doc_id").to_pylist()
        for row, (doc_id, text, ids, offsets) in enumerate(
            zip(doc_ids, texts, encoded_ids, encoded_offsets, strict=True)
        ):
            if not ids:  # only characters the tokenizer drops: keep the text, embed specials
                spans = [(0, 0)]
            elif self._truncate:
                spans = [(0, min(len(ids), self._window))]
            else:
                spans = window_spans(len(ids), window=self._window, overlap=self._overlap)
            for n, (start, stop) in enumerate(spans):
                window = ids[start:stop]
                covered = offsets[start:stop]
                chunk_text = text[covered[0][0] : covered[-1][1]] if covered else text
                out["id"].append(f"{doc_id}#{n}")
                out["doc_id"].append(doc_id)
                out["chunk"].append(n)
                out["text"].append(chunk_text)
                out["content_hash"].append(
                    content_hash(chunk_text, config_fingerprint=self._fingerprint)
                )
                out["input_ids"].append(self._with_specials(window))
                out["_truncated_tokens"].append(
                    len(ids) - stop if self._truncate and n == 0 else 0)
                take.append(row)
        indices = pa.array(take, type=pa.int64())
        hashes = docs.column(DOC_HASH_COLUMN) if DOC_HASH_COLUMN in docs.column_names \
            else document_hashes(docs, metadata_names=self._metadata_names)
        out[DOC_HASH_COLUMN] = pc.take(hashes, indices)
        for name in self._metadata_names:
            out[name] = pc.take(docs.column(name), indices)
        return pa.table({f.name: out[f.name] for f in self._schema}, schema=self._schema)
