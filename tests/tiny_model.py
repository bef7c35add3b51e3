"""A random-weight tiny model with MiniLM's real tokenizer: one layer, hidden size 32.

It loads in Quiver like any local model folder, and its forward pass costs almost
nothing, so tests (and `benchmarks/scale.py`) that exercise Ray, commits and faults
measure Quiver's own machinery, as a GPU job would see it, not the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HIDDEN = 32
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "sentence_bert_config.json", "modules.json",
                   "config_sentence_transformers.json")


def make_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """Write the tiny model folder at `out` (once; an existing folder is reused)."""
    import torch
    from transformers import BertConfig, BertModel

    from operators.model import describe_model
    from schemas.spec import ModelSpec

    if (out / "model.safetensors").is_file():
        return out
    bundled = Path(describe_model(ModelSpec()).path)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (bundled / name).is_file():
            shutil.copy(bundled / name, out / name)
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = json.loads((bundled / "1_Pooling" / "config.json").read_text())
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps({**pooling, "word_embedding_dimension": HIDDEN}, indent=2))
    vocab = json.loads((bundled / "config.json").read_text())["vocab_size"]
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512)
    BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    return out
