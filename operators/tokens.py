"""Tokenize as a model's fast tokenizer does, without loading transformers each time.

Every chunk task of a job runs in a Ray worker process, and a fresh one (every task
worker of a cold run, and of each new driver) used to spend about 1.9 s in
`AutoTokenizer.from_pretrained` before its first document: 0.55 s importing
transformers, 1.3 s building the tokenizer class. The encoding itself is done by the
tokenizer's engine, a `tokenizers.Tokenizer` (Rust), which loads from its JSON in
about 0.03 s. So the engine transformers builds for a model folder is saved once, as
JSON, under `<cache>/tokenizers/`, keyed by the folder's tokenizer files and the
library versions; later processes load that file and never import transformers.

Why the engine as transformers built it, not the folder's `tokenizer.json` as it is:
transformers adjusts the engine on load (a BERT tokenizer's normalizer follows
`do_lower_case` in `tokenizer_config.json`, added tokens come from the config files),
so the saved engine is the one whose output Quiver has always used. Its truncation and
padding are switched off, as transformers does for a call that asks for neither.

A model loaded with `trust_remote_code` may tokenize in its own Python code, so it keeps
the transformers tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import threading
from pathlib import Path

CACHE_ENV = "QUIVER_CACHE_DIR"
"""Where the saved engines live (default `~/.cache/quiver`)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
"""The files a tokenizer is built from: any change to them is another engine."""

Offsets = list[tuple[int, int]]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "quiver") / "tokenizers"


def engine_key(path: str) -> str:
    """A digest of the folder's tokenizer files and the versions that build the engine."""
    digest = hashlib.sha256(b"quiver-token-engine-1")
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    for name in TOKENIZER_FILES:
        file = Path(path) / name
        if file.is_file():
            digest.update(name.encode() + hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:32]


class TokenEngine:
    """Encodes text as the model's fast tokenizer does (see the module docstring)."""

    def __init__(self, engine=None, tokenizer=None) -> None:
        self._engine, self._tokenizer = engine, tokenizer
        if engine is not None:
            engine.no_truncation()
            engine.no_padding()

    def ids(self, text: str, *, specials: bool) -> list[int]:
        """The token ids of one text, with or without the model's special tokens."""
        if self._engine is not None:
            return self._engine.encode(text, add_special_tokens=specials).ids
        return self._tokenizer(text, add_special_tokens=specials)["input_ids"]

    def encode_batch(self, texts: list[str]) -> tuple[list[list[int]], list[Offsets]]:
        """Token ids and character offsets of each text, without special tokens."""
        if self._engine is not None:
            encoded = self._engine.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encoded], [e.offsets for e in encoded]
        out = self._tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                              return_attention_mask=False, return_token_type_ids=False,
                              verbose=False)
        return out["input_ids"], out["offset_mapping"]


@functools.lru_cache(maxsize=8)
def load_token_engine(path: str, trust_remote_code: bool = False) -> TokenEngine:
    """The folder's tokenizer as a `TokenEngine`, loaded once per process: from the saved
    engine when there is one, else built by transformers (and saved for next time).

    Raises:
        ModelError: the folder has no fast tokenizer.
    """
    from operators.model import load_tokenizer

    if trust_remote_code:
        return TokenEngine(tokenizer=load_tokenizer(path, trust_remote_code=True))
    from tokenizers import Tokenizer

    saved = cache_dir() / f"{engine_key(path)}.json"
    if saved.is_file():
        return TokenEngine(Tokenizer.from_file(str(saved)))
    text = load_tokenizer(path).backend_tokenizer.to_str()
    part = saved.with_name(f".{saved.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:  # a cache: a folder we cannot write only costs the next process the load
        saved.parent.mkdir(parents=True, exist_ok=True)
        part.write_text(text, encoding="utf-8")
        os.replace(part, saved)
    except OSError:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
    return TokenEngine(Tokenizer.from_str(text))
