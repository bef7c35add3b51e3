"""Chunking: windows cover every token, ids are deterministic, short texts match
sentence-transformers' truncation exactly."""

from __future__ import annotations

import pyarrow as pa
import pytest

from operators.chunk import Chunker, content_hash, special_tokens, window_spans
from operators.model import load_tokenizer


@pytest.mark.parametrize("n,window,overlap", [(1, 10, 2), (10, 10, 2), (11, 10, 2),
                                              (300, 254, 32), (1937, 254, 32), (99, 7, 0)])
def test_windows_cover_every_token_within_budget(n: int, window: int, overlap: int) -> None:
    spans = window_spans(n, window=window, overlap=overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(stop - start <= window for start, stop in spans)
    for (_, prev_stop), (start, _) in zip(spans, spans[1:], strict=False):
        assert prev_stop - start == overlap  # neighbours share exactly `overlap` tokens
    sizes = [stop - start for start, stop in spans]
    assert max(sizes) - min(sizes) <= 1  # balanced: no tiny tail chunk


def _chunker(model_info, **kw) -> Chunker:
    args = dict(max_tokens=model_info.max_tokens, overlap=32, document_prefix="",
                metadata=pa.schema([pa.field("year", pa.int64())]), config_fingerprint="cfg")
    args.update(kw)
    return Chunker(model_info.path, **args)


def _docs(texts: list[str]) -> pa.Table:
    return pa.table({"doc_id": [f"d{i}" for i in range(len(texts))],
                     "text": pa.array(texts, pa.large_string()),
                     "year": pa.array(range(len(texts)), pa.int64())})


def test_long_document_is_split_with_ids_and_metadata(model_info, stdlib_docs) -> None:
    long_doc = max(stdlib_docs, key=lambda d: len(d["text"]))["text"]
    out = _chunker(model_info)(_docs(["a short one", long_doc]))
    ids = out.column("id").to_pylist()
    assert ids[0] == "d0#0"
    n_long = len(ids) - 1
    assert n_long > 3
    assert ids[1:] == [f"d1#{n}" for n in range(n_long)]
    assert out.column("year").to_pylist() == [0] + [1] * n_long
    lengths = [len(x) for x in out.column("input_ids").to_pylist()]
    assert max(lengths) <= model_info.max_tokens
    # Every chunk's text is a real slice of the document, in order.
    chunk_texts = out.column("text").to_pylist()[1:]
    assert all(t in long_doc for t in chunk_texts)
    assert long_doc.startswith(chunk_texts[0]) and long_doc.rstrip().endswith(chunk_texts[-1])


def test_chunking_is_deterministic(model_info, stdlib_docs) -> None:
    docs = _docs([d["text"] for d in stdlib_docs[:20]])
    a, b = _chunker(model_info)(docs), _chunker(model_info)(docs)
    assert a.equals(b)


def test_short_text_ids_equal_tokenizer_truncation(model_info, stdlib_docs) -> None:
    tok = load_tokenizer(model_info.path)
    texts = [d["text"] for d in stdlib_docs[:30]]
    out = _chunker(model_info, mode="truncate")(_docs(texts))
    assert out.num_rows == len(texts)
    expected = tok(texts, truncation=True, max_length=model_info.max_tokens)["input_ids"]
    assert out.column("input_ids").to_pylist() == expected
    full = tok(texts)["input_ids"]
    assert out.column("_truncated_tokens").to_pylist() == [
        len(f) - len(e) for f, e in zip(full, expected, strict=True)]
    assert sum(out.column("_truncated_tokens").to_pylist()) > 0


def test_document_prefix_goes_after_the_leading_special(model_info) -> None:
    tok = load_tokenizer(model_info.path)
    head, tail = special_tokens(tok)
    out = _chunker(model_info, document_prefix="passage: ")(_docs(["hello world"]))
    ids = out.column("input_ids").to_pylist()[0]
    assert ids == tok("passage: hello world")["input_ids"]
    assert ids[: len(head)] == head and ids[-len(tail):] == tail


def test_content_hash_changes_with_text_and_config() -> None:
    h = content_hash("abc", config_fingerprint="m1")
    assert len(h) == 16
    assert h == content_hash("abc", config_fingerprint="m1")
    assert h != content_hash("abd", config_fingerprint="m1")
    assert h != content_hash("abc", config_fingerprint="m2")


def test_zero_rows(model_info) -> None:
    out = _chunker(model_info)(_docs([]))
    assert out.num_rows == 0
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())


TEN_MB_SCRIPT = """
import json, resource, sys
import pyarrow as pa
from operators.chunk import Chunker
path, max_tokens, corpus = sys.argv[1], int(sys.argv[2]), sys.argv[3]
text = "\\n\\n".join(json.loads(line)["text"] for line in open(corpus, encoding="utf-8"))
huge = (text * (10_000_000 // len(text) + 1))[:10_000_000]
chunker = Chunker(path, max_tokens=max_tokens, overlap=32, document_prefix="",
                  metadata=pa.schema([]), config_fingerprint="cfg")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = chunker(pa.table({"doc_id": ["d0"], "text": pa.array([huge], pa.large_string())}))
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
lengths = [len(x) for x in out.column("input_ids").to_pylist()]
print(json.dumps({"rows": out.num_rows, "longest": max(lengths), "grown_mb": grown,
                  "last": out.column("id").to_pylist()[-1]}))
"""


def test_a_10_mb_document_is_chunked_in_bounded_windows(model_info, tmp_path) -> None:
    """In a process of its own, so the peak RSS it reads is this chunking's, not that of
    whatever an earlier test in the same pytest process left behind."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    from jobs._demo import build_stdlib_corpus

    corpus = tmp_path / "stdlib.jsonl"
    build_stdlib_corpus(corpus)
    done = subprocess.run([sys.executable, "-c", TEN_MB_SCRIPT, model_info.path,
                           str(model_info.max_tokens), str(corpus)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["rows"] > 5_000 and got["longest"] <= model_info.max_tokens
    assert got["last"] == f"d0#{got['rows'] - 1}"
    assert got["grown_mb"] < 3_000  # tens of bytes per token, not a quadratic blow-up


def test_an_extremely_long_single_token_run(model_info) -> None:
    out = _chunker(model_info)(_docs(["x" * 2_000_000, "ok " + "y" * 500 + " fine"]))
    assert out.column("doc_id").to_pylist()[0] == "d0"
    assert all(len(x) <= model_info.max_tokens for x in out.column("input_ids").to_pylist())
    assert set(out.column("doc_id").to_pylist()) == {"d0", "d1"}
