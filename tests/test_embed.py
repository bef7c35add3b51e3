"""The embedder: shapes, norms, token-budget batches, and agreement with
sentence-transformers on real text."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from operators.embed import TextEncoder, pool, token_budget_batches
from operators.model import load_tokenizer
from schemas.records import vector_type


def test_token_budget_batches_respect_the_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 256, size=500).tolist()
    batches = token_budget_batches(lengths, batch_tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 2048
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.05  # sorted input: padding stays small
    assert token_budget_batches([9000], batch_tokens=100) == [[0]]


def test_pooling_modes_on_a_known_tensor() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (batch, seq, dim)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, mode="mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert pool(hidden, mask, mode="cls").tolist() == [[0.0, 1.0], [6.0, 7.0]]
    assert pool(hidden, mask, mode="lasttoken").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, mode="max")  # type: ignore[arg-type]


def test_batch_gets_a_fixed_size_vector_column(embedder, model_info) -> None:
    tok = load_tokenizer(model_info.path)
    texts = ["alpha beta", "a much longer sentence about vectors and tables", "x"]
    ids = tok(texts)["input_ids"]
    batch = pa.table({"id": ["a", "b", "c"], "input_ids": pa.array(ids, pa.list_(pa.int32()))})
    out = embedder(batch)
    assert out.column_names == ["id", "vector", "_tokens", "_forward_s", "_pool_s",
                                "_quantize_s", "_embedded_at", "_loaded_by"]
    # the block's forward seconds, spread evenly over its rows
    forward = out.column("_forward_s").to_pylist()
    assert forward[0] > 0 and forward == [forward[0]] * 3
    assert out.schema.field("vector").type == vector_type(384)
    v = np.array(out.column("vector").to_pylist())
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert out.column("_tokens").to_pylist() == [len(x) for x in ids]
    assert embedder(batch.slice(0, 0)).num_rows == 0


def test_order_does_not_depend_on_batching(embedder, model_info) -> None:
    tok = load_tokenizer(model_info.path)
    texts = [("word " * n).strip() for n in (50, 3, 120, 7, 80)]
    ids = tok(texts)["input_ids"]
    one = embedder.embed_ids(ids)
    embedder.batch_tokens, saved = 64, embedder.batch_tokens
    try:
        many = embedder.embed_ids(ids)
    finally:
        embedder.batch_tokens = saved
    np.testing.assert_allclose(one, many, atol=1e-5)


def test_matches_sentence_transformers_on_real_text(embedder, stdlib_docs) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [d["text"] for d in stdlib_docs[:40]]
    ours = TextEncoder(embedder).encode(texts, kind="document")
    reference = SentenceTransformer(embedder.info.path, device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=16)
    cosine = (ours * reference).sum(axis=1)
    assert cosine.min() > 0.9999


def test_bf16_autocast_path_agrees_with_fp32(model_info, embedder, stdlib_docs) -> None:
    """The reduced-precision path GPUs take (autocast, fp32 pooling) run here on CPU."""
    from operators.embed import Embedder

    texts = [d["text"] for d in stdlib_docs[:16]]
    fp32 = TextEncoder(embedder).encode(texts, kind="document")
    bf16 = TextEncoder(Embedder(model_info, precision="bf16", device="cpu",
                                torch_threads=2)).encode(texts, kind="document")
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(axis=1)
    assert cosine.mean() >= 0.9999 and cosine.min() > 0.999


def test_fp16_on_cpu_and_missing_gpu_are_refused(model_info) -> None:
    from operators.embed import Embedder, pick_device

    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        Embedder(model_info, precision="fp16", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            pick_device("cuda")
        assert pick_device("auto") == "cpu"


def test_actor_layout_gpu_and_cpu() -> None:
    from jobs._layout import actor_layout
    from schemas.spec import parse_spec

    spec = parse_spec({"kind": "embed", "table": "t.lance",
                       "source": {"uri": "c.jsonl", "id_field": "_id"}})
    gpu = actor_layout(spec, cpus=32, gpus=4, cores=32)
    assert (gpu.actors, gpu.gpus) == (4, 1.0)  # one actor per GPU
    two = parse_spec({**spec.model_dump(), "compute": {"actors": 2}})
    cpu = actor_layout(two, cpus=2, gpus=0, cores=2)
    assert cpu.actors == 2 and cpu.actors * cpu.cpus <= 1.0  # a CPU stays free for reads
    assert cpu.threads == 1
    pinned = parse_spec({**spec.model_dump(), "model": {"device": "cpu"}})
    assert actor_layout(pinned, cpus=8, gpus=2, cores=8).gpus == 0.0


def test_a_model_with_a_module_quiver_cannot_run_is_refused(tiny_model, tmp_path) -> None:
    """A sentence-transformers model with a Dense layer after pooling: Quiver would give
    vectors of the wrong size without it, so describing the model fails, naming it."""
    import json
    import shutil

    from operators.model import describe_model
    from schemas.errors import ModelError
    from schemas.spec import ModelSpec

    folder = tmp_path / "with-dense"
    shutil.copytree(tiny_model, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense",
                       "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))
    assert describe_model(ModelSpec(name=tiny_model)).dim == 32  # the tiny model itself runs
    with pytest.raises(ModelError, match=r"'2' is 'sentence_transformers\.models\.Dense'"):
        describe_model(ModelSpec(name=str(folder)))


def test_out_of_gpu_memory_halves_the_batch_and_gives_the_same_vectors(tiny_model,
                                                                       capsys) -> None:
    """The model raises CUDA's out-of-memory error on batches of more than 3 rows (as a
    GPU would on a batch too wide for it): the embedder halves such batches until they
    fit, halves its budget for the rest, says so, and returns exactly the vectors an
    unconstrained run gives."""
    from operators.embed import Embedder
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    info = describe_model(ModelSpec(name=tiny_model))
    ids = [[101, *range(1000, 1000 + n), 102] for n in (30, 5, 17, 2, 9, 40, 11, 3)]
    free = Embedder(info, device="cpu", batch_tokens=4096).embed_ids(ids)

    tight = Embedder(info, device="cpu", batch_tokens=4096)
    model, tried, fitted = tight.model, [], []

    def small_gpu(**inputs):
        rows = inputs["input_ids"].shape[0]
        tried.append(rows)
        if rows > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        fitted.append(rows)
        return model(**inputs)

    tight.model = small_gpu
    out = tight.embed_ids(ids)
    np.testing.assert_allclose(out, free, rtol=1e-5, atol=1e-6)
    assert tried[0] == 8  # the whole block fit the budget: one batch, which failed
    assert sum(fitted) == len(ids)  # each row embedded once, in batches that fit
    assert tight.batch_tokens < 4096
    assert "out of GPU memory on a batch of 8 rows" in capsys.readouterr().err


def test_the_embedder_runs_sdpa_attention(tiny_model) -> None:
    """The attention kernel is the one a GPU needs (transformers' SDPA path), and it is
    the same code the CPU runs, so the CPU tests cover it."""
    from operators.embed import Embedder
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    assert Embedder(describe_model(ModelSpec(name=tiny_model)), device="cpu").attention \
        == "sdpa"


def test_staged_blocks_give_the_same_vectors_and_reuse_one_buffer(tiny_model) -> None:
    """The GPU path's host side, run on CPU: each block is padded into one staging
    buffer (grown when a block needs more room, reused after) and its batches are views
    of the block's one copy; the block comes back with exactly the vectors the unstaged
    path gives, in input order, and the stage clocks read once per block."""
    from operators.embed import Embedder, PinnedStaging
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    info = describe_model(ModelSpec(name=tiny_model))
    rng = np.random.default_rng(3)
    ids = [[101, *rng.integers(1000, 2000, size=n).tolist(), 102]
           for n in rng.integers(1, 200, size=60)]
    plain = Embedder(info, device="cpu", batch_tokens=1024)
    want = plain.embed_ids(ids)
    staged = Embedder(info, device="cpu", batch_tokens=1024)
    staged._staging = staging = PinnedStaging("cpu")
    column = pa.array(ids, pa.list_(pa.int32()))
    out = staged.encode_ids(column)["vector"]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    buffer = staging._ids
    padded = sum(len(i) for i in ids)
    assert buffer.numel() >= padded  # the whole block, padding included, in one buffer
    assert staged.seconds["forward"] > 0 and staged._marks == []
    again = staged.encode_ids(column)["vector"]  # the same buffer, the same answer
    assert staging._ids is buffer
    np.testing.assert_array_equal(again, out)


def test_padded_block_lays_every_batch_out_once(tiny_model) -> None:
    """A block is padded once: each batch is a right-padded (rows, width) view holding
    exactly its rows' ids, longest rows first, each batch within the token budget."""
    from operators.embed import PaddedBlock, _offsets_and_values

    rng = np.random.default_rng(5)
    rows = [rng.integers(1, 30000, size=n).tolist() for n in rng.integers(1, 300, size=200)]
    offsets, values = _offsets_and_values(rows)
    block = PaddedBlock(offsets, values, batch_tokens=2048, pad_id=-1)
    seen = []
    for start, stop, ids, real in block.batches(block.ids, block.real):
        order = block.order[start:stop]
        assert ids.shape[0] * ids.shape[1] <= 2048 or ids.shape[0] == 1
        assert ids.shape[1] == max(len(rows[i]) for i in order)
        for k, i in enumerate(order):
            n = len(rows[i])
            assert ids[k, :n].tolist() == rows[i] and (ids[k, n:] == -1).all()
            assert real[k].sum() == n and real[k, :n].all()
        seen += order.tolist()
    assert sorted(seen) == list(range(200))
    assert [len(rows[i]) for i in seen] == sorted((len(r) for r in rows), reverse=True)


def test_gpu_blocks_follow_the_token_budget() -> None:
    """A GPU actor's block is an explicit number of rows derived from the token budget;
    CPU actors keep small blocks; a spec's rows_per_batch wins over both."""
    from jobs._layout import actor_layout
    from schemas.spec import parse_spec

    base = {"kind": "embed", "table": "t.lance", "source": {"uri": "c.jsonl", "id_field": "i"}}
    spec = parse_spec(base)
    gpu = actor_layout(spec, cpus=8, gpus=1, cores=8, chunk_tokens=256)
    assert gpu.rows_per_block == 1024 and actor_layout(
        spec, cpus=8, gpus=0, cores=8).rows_per_block == 256
    wide = parse_spec({**base, "compute": {"batch_tokens": 65536}})
    assert actor_layout(wide, cpus=8, gpus=1, cores=8, chunk_tokens=512).rows_per_block == 1024
    pinned = parse_spec({**base, "compute": {"rows_per_batch": 300}})
    assert actor_layout(pinned, cpus=8, gpus=1, cores=8).rows_per_block == 300


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
@pytest.mark.parametrize("normalize", [True, False])
def test_block_pooling_matches_each_row_alone(tiny_model, pooling, normalize) -> None:
    """Pooled over a whole padded block (sums per batch, the mean's division once per
    block or none where vectors are normalised, the last token found from the counts),
    every row gets the vector its own unpadded forward gives, in input order, over
    several batches of several widths."""
    import dataclasses

    from operators.embed import Embedder
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    info = dataclasses.replace(describe_model(ModelSpec(name=tiny_model)), pooling=pooling,
                               normalize=normalize)
    embedder = Embedder(info, device="cpu", batch_tokens=64)
    rng = np.random.default_rng(3)
    ids = [[101, *rng.integers(1000, 20000, size=n).tolist(), 102]
           for n in rng.integers(0, 40, size=25)]
    got = embedder.embed_ids(ids)
    with torch.inference_mode():
        want = []
        for row in ids:
            hidden = embedder.model(input_ids=torch.tensor([row])).last_hidden_state[0]
            vector = {"mean": hidden.mean(0), "cls": hidden[0], "lasttoken": hidden[-1]}[pooling]
            want.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    np.testing.assert_allclose(got, torch.stack(want).numpy(), rtol=1e-4, atol=1e-5)
