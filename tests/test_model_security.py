"""A model folder is data, not code: its Python runs only when the spec allows it, and its
weights load from safetensors, never from a pickle, when both are there."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from operators.embed import Embedder
from operators.model import describe_model
from schemas.spec import ModelSpec

CUSTOM_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")

from transformers import BertModel


class MarkedBert(BertModel):
    pass
"""


class _Payload:
    """Unpickling this writes the marker: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",))


pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def _copy_model(model_info, dest: Path) -> Path:
    folder = dest / "model"
    shutil.copytree(model_info.path, folder)
    return folder


def _embed_one(folder: Path, *, trust_remote_code: bool = False) -> np.ndarray:
    info = describe_model(ModelSpec(name=str(folder), trust_remote_code=trust_remote_code))
    embedder = Embedder(info, precision="fp32", device="cpu",
                        trust_remote_code=trust_remote_code)
    return embedder.embed_ids([[101, 7592, 2088, 102]])


def test_remote_code_runs_only_when_the_spec_allows_it(model_info, tmp_path) -> None:
    folder = _copy_model(model_info, tmp_path)
    marker = tmp_path / "code-ran"
    (folder / "marked_bert.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "marked_bert.MarkedBert"}
    (folder / "config.json").write_text(json.dumps(config))

    default = _embed_one(folder)  # spec default: trust_remote_code false
    assert not marker.exists(), "the model folder's Python ran without trust_remote_code"
    assert default.shape == (1, model_info.dim)

    allowed = _embed_one(folder, trust_remote_code=True)
    assert marker.exists(), "trust_remote_code: true should load the folder's own class"
    np.testing.assert_allclose(allowed, default, atol=1e-5)  # same weights either way


def test_weights_come_from_safetensors_not_the_pickle(model_info, tmp_path) -> None:
    folder = _copy_model(model_info, tmp_path)
    marker = tmp_path / "pickle-ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    reference = _embed_one(Path(model_info.path))

    vectors = _embed_one(folder)
    assert not marker.exists(), "the pickle was unpickled although safetensors exist"
    np.testing.assert_allclose(vectors, reference, atol=1e-6)

    (folder / "model.safetensors").unlink()  # only the hostile pickle is left
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _embed_one(folder)  # torch's weights-only unpickler refuses code in a pickle
    assert not marker.exists(), "a pickle with code in it was executed"
