"""Shared fixtures: the default model loaded once, a local Ray, and real corpora."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at nice 15. Beside any load at nice 0 (another build, `stress`)
# they get about 3% of a core, and a Ray test that takes 10 s takes minutes: measured,
# `make test` beside two busy loops had run 67 of 304 tests in 20 minutes. At nice 0 a
# busy machine slows the suite, as it should, instead of stopping it. Every Ray the tests
# start (`ray.init`, `ray start`, `quiver` subprocesses) reads this from the environment.
os.environ.setdefault("RAY_worker_niceness", "0")
# The suite's small jobs stand in for large ones, so they run the embed actor pool that a
# large job runs; a small one-off run starts one model actor while it plans instead
# (`jobs._embed_service.early_wanted`), and the tests of that path turn it back on.
os.environ.setdefault("QUIVER_EARLY_EMBEDDER", "0")

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"


def eval_dir(name: str) -> Path:
    """A BEIR folder under ../shared/eval, or a clean skip when it is absent."""
    path = EVAL / name
    if not (path / "corpus.jsonl").is_file():
        pytest.skip(f"{path} not present (../shared is absent)")
    return path


@pytest.fixture(scope="session")
def model_info():
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    return describe_model(ModelSpec())


@pytest.fixture(scope="session")
def embedder(model_info):
    from operators.embed import Embedder

    return Embedder(model_info, torch_threads=2)


@pytest.fixture(scope="session")
def stdlib_docs(tmp_path_factory) -> list[dict]:
    """Real prose every machine has: the standard library's module docstrings."""
    from jobs._demo import build_stdlib_corpus

    out = tmp_path_factory.mktemp("corpus") / "stdlib.jsonl"
    build_stdlib_corpus(out)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def stdlib_chunks(model_info, stdlib_docs):
    """The first 120 standard-library docstrings cut into 128-token chunks (about 500)."""
    import pyarrow as pa

    from operators.chunk import Chunker

    docs = pa.table({"doc_id": [d["id"] for d in stdlib_docs[:120]],
                     "text": pa.array([d["text"] for d in stdlib_docs[:120]], pa.large_string())})
    chunker = Chunker(model_info.path, max_tokens=128, overlap=16, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint="test")
    return chunker(docs)


@pytest.fixture(scope="session")
def stdlib_vectors(embedder, stdlib_chunks):
    """Real all-MiniLM-L6-v2 output (full size, float32) for every `stdlib_chunks` row,
    embedded once for the codec and search tests."""
    return embedder.embed_ids(stdlib_chunks.column("input_ids").to_pylist())


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from jobs._ray import ensure_ray

    ensure_ray()
    yield
    ray.shutdown()


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """Write records (dicts are dumped, strings written as they are) one per line."""
    with path.open("w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def checkpoint_versions(path: Path | str, storage_options: dict | None = None) -> list[int]:
    """The table's versions whose commit names shards: a job's checkpoints (a new table's
    first version is its empty creation, which names none)."""
    import lance

    from operators.shard_labels import decode
    from operators.write import SHARDS_KEY

    ds = lance.dataset(str(path), storage_options=storage_options)
    found = []
    for v in sorted(x["version"] for x in ds.versions()):
        txn = ds.read_transaction(v)
        label = (txn.transaction_properties or {}).get(SHARDS_KEY) if txn else None
        if label and decode(label):
            found.append(v)
    return found


def manifest_for(model_info, *, codecs: list[str] | None = None, dims: int | None = None,
                 sample=None):
    """The manifest a job with these vector settings writes (int8 ranges from `sample`)."""
    from jobs._embed_job import build_manifest
    from operators.quantize import calibrate_int8, truncate_query
    from schemas.spec import parse_spec

    spec = parse_spec({"kind": "embed", "table": "t.lance",
                       "source": {"uri": "c.jsonl", "id_field": "id"},
                       "vectors": {"codecs": codecs or ["float32"], "dims": dims}})
    manifest = build_manifest(spec, model_info, precision="fp32")
    if "int8" in manifest.vectors.codecs:
        v = manifest.vectors
        cut = [truncate_query(x, v.dims, renormalize=v.truncated) for x in sample]
        low, high = calibrate_int8(cut)
        manifest = manifest.model_copy(update={"vectors": v.model_copy(
            update={"int8_low": low, "int8_high": high})})
    return manifest


def chunk_ids(model_info, docs: list[dict]) -> list[str]:
    """The sorted chunk ids a default job makes of `docs` (id, text), by Quiver's chunker."""
    import pyarrow as pa

    from operators.chunk import Chunker

    chunker = Chunker(model_info.path, max_tokens=model_info.max_tokens, overlap=32,
                      document_prefix="", metadata=pa.schema([]), config_fingerprint="x")
    table = pa.table({"doc_id": [d["id"] for d in docs],
                      "text": pa.array([d["text"] for d in docs], pa.large_string())})
    return sorted(chunker(table).column("id").to_pylist())


def loopback_cluster(*, head: dict, workers: list[dict]):
    """A real several-node Ray cluster whose every server listens on 127.0.0.1.

    Started under the same switch as a local Quiver run, so the nodes, their dashboard and
    the job drivers Ray spawns all keep 127.0.0.1 instead of the host's IP. Returns the
    cluster and its worker nodes (for `remove_node`).
    """
    from ray.cluster_utils import Cluster

    from jobs._ray import LOOPBACK, ray_on_loopback

    with ray_on_loopback():
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"node_ip_address": LOOPBACK, **head})
        nodes = [cluster.add_node(node_ip_address=LOOPBACK, **w) for w in workers]
        cluster.wait_for_nodes()
    return cluster, nodes


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(warehouse: Path | str, env: dict[str, str], *, extra: list[str] = (),
                 **popen) -> tuple[object, str]:
    """`quiver serve --warehouse DIR [extra flags]` on a free 127.0.0.1 port, once
    `/health` answers: (the process, its base URL). Fails with the server's output if it
    never does."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--warehouse",
                             str(warehouse), "--port", str(port), *extra], cwd=REPO, env=env,
                            **({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
                               | popen))
    base = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    out = proc.stdout.read().decode()[-2000:] if proc.stdout else ""
    raise RuntimeError(f"quiver serve never answered /health: {out}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The random one-layer model folder (hidden 32) with MiniLM's tokenizer."""
    from tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))
