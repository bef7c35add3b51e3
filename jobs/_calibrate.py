"""Calibration: embed a spread-out sample of chunks on the driver, for what the table's
codes are fitted on (the int8 ranges, the first-stage code).

It runs once, when a table is created with the int8 codec or a `vectors.code`; the
ranges and the codebook's digest go into the manifest before any actor starts, so every
actor, every later append and every query quantize on the same grid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from jobs._plan import progress
from operators.codebooks import save_codebook
from operators.codecs import Codec, fit
from operators.embed import Embedder
from operators.model import ModelInfo
from operators.quantize import calibrate_int8, sample_positions, truncate
from operators.sources.plan import ReadPlan
from operators.sources.read import sample_documents
from operators.sources.skips import Skips
from schemas.errors import SpecError
from schemas.manifest import CodeManifest, TableManifest
from schemas.source import Shard
from schemas.spec import JobSpec, Precision, SourceSpec


def sample_chunks(shards: list[Shard], *, source: SourceSpec, metadata: pa.Schema,
                  chosen: dict[str, str], chunker: Callable[[pa.Table], pa.Table],
                  wanted: int, skips: Skips | None) -> list[list[int]]:
    """Token ids of about `wanted` chunks, from shards spread evenly over the source.

    Enough documents are read for twice the wanted rows (so the sample is spread within
    them too), always deterministically, so a rerun calibrates identically.
    """
    docs = sample_documents(shards, wanted=2 * wanted, source=source, metadata=metadata,
                            chosen=chosen, skips=skips)
    if docs is None:
        return []
    ids = chunker(docs).column("input_ids")
    return [ids[i].as_py() for i in sample_positions(len(ids), wanted)]


def sample_vectors(info: ModelInfo, input_ids: list[list[int]], *, device: str,
                   precision: Precision, dims: int, renormalize: bool, batch_tokens: int,
                   torch_threads: int, trust_remote_code: bool = False) -> np.ndarray:
    """The sample's vectors as the table stores them (after its truncation), embedded on
    `device` in the job's precision."""
    embedder = Embedder(info, precision=precision, device=device, batch_tokens=batch_tokens,
                        torch_threads=torch_threads, trust_remote_code=trust_remote_code)
    return as_stored(embedder.embed_ids(input_ids), dims, renormalize=renormalize)


def as_stored(full: np.ndarray, dims: int, *, renormalize: bool) -> np.ndarray:
    """Full-size vectors cut to the table's `dims` (Matryoshka), renormalised if asked."""
    import torch

    return np.asarray(truncate(torch.from_numpy(full), dims, renormalize=renormalize).numpy())


def embed_sample(info: ModelInfo, input_ids: list[list[int]], *, on_gpu: bool,
                 in_task: bool | None = None, actor=None, **kwargs) -> np.ndarray:
    """`sample_vectors` where the job's GPUs are: a cluster's driver has none, so a job
    that embeds on GPUs sends the sample to one GPU task; on CPU the model actor the run
    started while planning (`actor`, `jobs._embed_service.EarlyEmbedder`) embeds it when
    there is one, and otherwise the driver with all its cores (a task would add a
    worker's start-up and model load). The vectors (sample × dims floats: 6 MB for
    4,096 of 384) are all that come back. `in_task` forces the task (a test runs the GPU
    path's task on CPU)."""
    import ray

    if actor is not None and not on_gpu and not in_task:
        full = ray.get(actor.embed_ids.remote(input_ids))
        return as_stored(full, kwargs["dims"], renormalize=kwargs["renormalize"])
    if not (on_gpu if in_task is None else in_task):
        return sample_vectors(info, input_ids, device="cpu",
                              torch_threads=os.cpu_count() or 1, **kwargs)
    task = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0)(sample_vectors)
    return ray.get(task.remote(info, input_ids, device="cuda" if on_gpu else "cpu",
                               torch_threads=1, **kwargs))


def calibrated(manifest: TableManifest, spec: JobSpec, plan: ReadPlan,
                chunk: Callable[[pa.Table], pa.Table], info: ModelInfo, *, int8: bool,
                code: bool, precision: Precision, on_gpu: bool = False, actor=None
                ) -> tuple[TableManifest, Codec | None]:
    """The manifest with what a sample of the corpus's vectors decides: the int8 ranges,
    and the fitted first-stage code (its codebook written beside the table first, so
    no version of the table ever names a file that is not there). One sample, embedded
    once (on the run's early model actor, `actor`, when it has one), serves both."""
    started = time.perf_counter()
    wanted = max(spec.vectors.calibration_sample if int8 else 0,
                 spec.vectors.code.sample if code else 0)
    sample = sample_chunks(plan.shards, source=spec.source, metadata=plan.metadata,
                           chosen=plan.chosen, chunker=chunk, wanted=wanted,
                           skips=plan.skips)
    vectors = manifest.vectors
    stored = np.zeros((0, vectors.dims), np.float32)
    if sample:
        stored = embed_sample(
            info, sample, on_gpu=on_gpu, actor=actor, precision=precision, dims=vectors.dims,
            renormalize=info.normalize and vectors.truncated,
            batch_tokens=spec.compute.batch_tokens,
            trust_remote_code=spec.model.trust_remote_code)
    update: dict = {}
    if int8:
        # spread over the whole sample (itself spread over the corpus), not its head
        sampled = stored[list(sample_positions(len(stored), spec.vectors.calibration_sample))]
        if len(sampled):
            update["int8_low"], update["int8_high"] = calibrate_int8(sampled)
        else:  # nothing to sample: the widest range a normalised vector can span
            update["int8_low"], update["int8_high"] = [-1.0] * vectors.dims, [1.0] * vectors.dims
        progress(f"int8 calibrated on {len(sampled)} chunks")
    fitted = None
    if code:
        wanted_code = spec.vectors.code
        try:
            fitted = fit(stored, wanted_code.name, wanted_code.bytes)
        except ValueError as err:
            raise SpecError(f"vectors.code: {err} (the sample had {len(stored)} chunks of "
                            f"{vectors.dims} dims)") from None
        sha = save_codebook(spec.table, fitted, spec.write.storage_options)
        update["code"] = CodeManifest(name=fitted.name, nbytes=fitted.nbytes, sha256=sha,
                                      sample_rows=len(stored))
        progress(f"first-stage code {fitted.name} ({fitted.nbytes} B/vector) fitted on "
                 f"{len(stored)} chunks; codebook {sha[:12]}")
    progress(f"sample embedded and fitted in {time.perf_counter() - started:.1f}s")
    return manifest.model_copy(update={"vectors": vectors.model_copy(update=update)}), fitted
