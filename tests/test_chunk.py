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
    from operators.tokens import TokenEngine

    tok = load_tokenizer(model_info.path)
    head, tail = special_tokens(TokenEngine(tokenizer=tok))
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


MIXED = ["Café naïve façade — ÉCOLE", "x² + y² = z²; αβγ", "tab\tand\nnewline  spaces",
         "", "   ", "🙂 emoji and 中文 and العربية", "don't stop-words: a.b.c"]


def test_the_saved_token_engine_tokenizes_as_transformers_does(model_info, tiny_model,
                                                               stdlib_docs, tmp_path,
                                                               monkeypatch) -> None:
    """The engine Quiver saves and reloads gives the ids and offsets of the
    transformers tokenizer it was taken from, on real and awkward text."""
    from operators.tokens import CACHE_ENV, TokenEngine, cache_dir, load_token_engine

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    texts = [d["text"] for d in stdlib_docs[:60]] + MIXED
    for path in (model_info.path, tiny_model):
        load_token_engine.cache_clear()
        built = load_token_engine(path)  # transformers builds it, then it is saved
        load_token_engine.cache_clear()
        saved = load_token_engine(path)  # read back from the saved file
        reference = TokenEngine(tokenizer=load_tokenizer(path))
        assert saved.encode_batch(texts) == built.encode_batch(texts) \
            == reference.encode_batch(texts)
        assert [saved.ids(t, specials=True) for t in MIXED] == \
            [load_tokenizer(path)(t)["input_ids"] for t in MIXED]
    # the tiny model was saved with MiniLM's tokenizer files: the same engine, saved once
    assert len(list(cache_dir().glob("*.json"))) == 1
    load_token_engine.cache_clear()


def test_a_tokenizer_setting_is_another_engine(model_info, tmp_path, monkeypatch) -> None:
    """transformers rebuilds a BERT normalizer from `do_lower_case`: the saved engine
    follows the setting, and the setting changes the engine's key."""
    import json
    import shutil
    from pathlib import Path

    from operators.tokens import CACHE_ENV, engine_key, load_token_engine

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cased = tmp_path / "cased"
    cased.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(model_info.path) / name, cased / name)
    config = json.loads((cased / "tokenizer_config.json").read_text())
    (cased / "tokenizer_config.json").write_text(json.dumps({**config,
                                                             "do_lower_case": False}))
    assert engine_key(str(cased)) != engine_key(model_info.path)
    load_token_engine.cache_clear()
    text = ["Hello World from Paris"]
    lower, upper = load_token_engine(model_info.path), load_token_engine(str(cased))
    assert upper.encode_batch(text)[0] != lower.encode_batch(text)[0]
    assert upper.encode_batch(text)[0] == \
        load_tokenizer(str(cased))(text, add_special_tokens=False)["input_ids"]
    load_token_engine.cache_clear()


def test_a_chunk_worker_with_a_saved_engine_never_imports_transformers(
        model_info, tmp_path) -> None:
    """The first process builds and saves the engine; the next one chunks the same
    documents to the same rows without importing transformers."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    from operators.tokens import CACHE_ENV

    script = (
        "import hashlib, json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import pyarrow as pa\n"
        "from operators.chunk import Chunker\n"
        f"chunker = Chunker({model_info.path!r}, max_tokens=64, overlap=8, "
        "document_prefix='', metadata=pa.schema([]), config_fingerprint='cfg')\n"
        "texts = ['Café naïve façade ' * 40, 'a short one', 'x² + y² = z²']\n"
        "out = chunker(pa.table({'doc_id': ['a', 'b', 'c'], 'text': texts}))\n"
        "print(json.dumps({'transformers': 'transformers' in sys.modules, "
        "'rows': out.num_rows, 'ids': hashlib.sha256(repr(out.column('input_ids')"
        ".to_pylist()).encode()).hexdigest()}))\n")
    env = {**os.environ, CACHE_ENV: str(tmp_path), "HF_HUB_OFFLINE": "1"}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["transformers"] and not second["transformers"]
    assert first["rows"] == second["rows"] > 3 and first["ids"] == second["ids"]
