"""Embedding inference: token ids in, pooled (and normalised) vectors out.

The embedder is a callable class so that Ray Data can hold one per actor: `__init__`
loads the model once, `__call__` maps a batch of chunk rows to the same rows with a
`vector` column. Inputs are sorted by length and cut into batches under a padded-token
budget, so a batch of short chunks is wide and a batch of long ones is narrow, and
padding stays small.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from operators.model import ModelInfo, load_tokenizer
from operators.quantize import Codebook, encode, fixed_size_list
from operators.timing import EMBEDDED_AT, LOADED_BY, STAGE_COLUMNS, constant_columns
from schemas.kinds import Device, Pooling, Precision, PrecisionChoice


def _offsets_and_values(input_ids) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of token id lists: an Arrow list column, or Python lists. The
    offsets index `values` as they are (a sliced column's start included).

    >>> o, v = _offsets_and_values([[1, 2], [3]])
    >>> o.tolist(), v.tolist()
    ([0, 2, 3], [1, 2, 3])
    """
    if isinstance(input_ids, pa.ChunkedArray):
        input_ids = (input_ids.chunk(0) if input_ids.num_chunks == 1
                     else input_ids.combine_chunks())
    if not isinstance(input_ids, pa.Array):
        input_ids = pa.array(list(input_ids), pa.list_(pa.int64()))
    if len(input_ids) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    return input_ids.offsets.to_numpy(), input_ids.values.to_numpy(zero_copy_only=False)


def budget_cuts(lengths: np.ndarray, *, batch_tokens: int
                ) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Row order, longest first, and the (start, stop, width) of each batch in that
    order, so each batch's padded size fits the budget. Sorted, a batch led by a row of
    width w holds budget // w rows, so the loop runs once per batch, not per row, on
    Python ints; a single row longer than the budget still gets a batch of its own.

    >>> budget_cuts(np.array([5, 1, 3, 4]), batch_tokens=8)
    (array([0, 3, 2, 1]), [(0, 1, 5), (1, 3, 4), (3, 4, 1)])
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    widths = lengths[order].tolist()
    cuts, start, n = [], 0, len(widths)
    while start < n:
        width = widths[start]
        stop = n if width == 0 else min(n, start + max(1, batch_tokens // width))
        cuts.append((start, stop, width))
        start = stop
    return order, cuts


def token_budget_batches(lengths: Sequence[int], *, batch_tokens: int) -> list[list[int]]:
    """Row indices per batch, longest first (`budget_cuts` as lists).

    >>> token_budget_batches([5, 1, 3, 4], batch_tokens=8)
    [[0], [3, 2], [1]]
    """
    order, cuts = budget_cuts(np.asarray(lengths, np.int64), batch_tokens=batch_tokens)
    return [order[a:b].tolist() for a, b, _ in cuts]


def pool(hidden, mask, *, mode: Pooling):
    """Pool token states to one vector per input, in float32.

    Args:
        hidden: (batch, seq, dim) token states, any float dtype.
        mask: (batch, seq) attention mask of 0/1.
        mode: mean over real tokens, the first token, or the last real token.
    """
    import torch

    weights = mask.to(torch.float32)
    counts = weights.sum(dim=1)
    out = torch.empty((hidden.shape[0], 1, hidden.shape[2]), dtype=torch.float32,
                      device=hidden.device)
    pool_into(out, hidden, weights.unsqueeze(1), counts, mode=mode)
    return mean_of_sums(out.squeeze(1), counts) if mode == "mean" else out.squeeze(1)


def pool_into(out, hidden, weights, counts, *, mode: Pooling) -> None:
    """Pool one batch into `out`, its (batch, 1, dim) float32 rows of the block's result.

    Mean pooling writes the *sum* over real tokens: one batched matmul of the mask as
    float32 (`weights`, (batch, 1, seq)) with the states. The division by the token
    `counts` is left to `mean_of_sums`, once per block, or skipped where the model
    normalises, since the direction is the same. After a forward pass every call runs
    with cold caches, so one kernel per batch beats a cast, a sum and a division.
    """
    import torch

    if hidden.dtype != torch.float32:  # accumulate in fp32 whatever the model ran in
        hidden = hidden.float()
    if mode == "mean":  # (batch, 1, seq) @ (batch, seq, dim)
        torch.bmm(weights, hidden, out=out)
    elif mode == "cls":
        out.copy_(hidden[:, :1])
    elif mode == "lasttoken":  # right padding: the last real token of each row
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        out[:, 0] = hidden[rows, counts.long() - 1]
    else:
        raise ValueError(f"Got {mode!r} for pooling. Must be one of mean, cls, lasttoken.")


def mean_of_sums(sums, counts):
    """Mean-pooled vectors from `pool_into`'s sums, (n, dim), and each row's token count."""
    return sums / counts.clamp(min=1e-9).unsqueeze(1)


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
"""Padded tokens per forward pass. On CPU, 4096 ran 3% faster than 8192 in a one-thread
actor and pads less. A GPU needs wide batches to fill its cores: 32,768 tokens (128
full 256-token chunks) keeps a data-center GPU (A100, H100) busy on BERT-sized models
while using well under 1 GB for activations; a smaller GPU that runs out of memory
halves the batch and goes on (`Embedder._halve_budget`)."""


CPU_ROWS_PER_BLOCK = 256
"""Chunks a CPU actor gets at once. Small blocks keep every actor busy to the end; each
block also costs the actor about 1 ms of cold-cache work around its forward passes
(padding, pooling, Arrow), and Ray a task. The SciFact job (real model, 2 actors) ran
99-106 s at 256 against 109-111 s at 128; at 512 the layout gave it one actor."""
GPU_BATCHES_PER_BLOCK = 8
"""Full-width token budgets in a GPU actor's block: the host pads batch k+1 while the
device runs batch k, and the block's one sync and one copy back are spread over many
forward passes (at 256-token chunks and the 32,768-token GPU budget: 1,024 rows).
`jobs._layout.rows_per_block` turns it into rows."""


def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_kind(flags: frozenset[str] | None = None) -> str:
    """How this CPU runs bf16 matrix products, for a benchmark's header line.

    Timings differ by more than 2x between these kinds: AVX2 has no bf16 instructions
    (`auto` stays fp32), AVX-512 BF16 runs bf16 dot products about 1.9x fp32, and AMX
    (Sapphire Rapids and later) runs bf16 tiles about twice as fast again on MiniLM.

    >>> cpu_kind(frozenset({"avx2", "avx512_bf16", "amx_bf16"})), cpu_kind(frozenset({"avx2"}))
    ('AMX BF16', 'AVX2')
    """
    flags = cpu_flags() if flags is None else flags
    for flag, kind in (("amx_bf16", "AMX BF16"), ("avx512_bf16", "AVX-512 BF16"),
                       ("avx2", "AVX2")):
        if flag in flags:
            return kind
    return "other"


def resolve_precision(requested: PrecisionChoice, *, on_gpu: bool,
                      flags: frozenset[str] | None = None) -> Precision:
    """Turn 'auto' into the fastest precision that agrees with fp32.

    bf16 autocast keeps fp32's exponent range, so it is safe for any model; measured on
    all-MiniLM-L6-v2 it gives mean cosine 0.99998 to fp32 at 1.9x the speed on a CPU with
    AVX-512 BF16. CPUs without native bf16 emulate it slower than fp32, so they stay fp32.

    >>> resolve_precision("auto", on_gpu=False, flags=frozenset({"avx512_bf16"}))
    'bf16'
    >>> resolve_precision("auto", on_gpu=False, flags=frozenset({"avx2"}))
    'fp32'
    >>> resolve_precision("auto", on_gpu=True)
    'bf16'
    >>> resolve_precision("fp16", on_gpu=False)
    'fp16'
    """
    if requested != "auto":
        return requested
    if on_gpu:
        return "bf16"
    flags = cpu_flags() if flags is None else flags
    return "bf16" if any(f in flags for f in BF16_CPU_FLAGS) else "fp32"


def gpu_half_precision(precision: Precision, *, bf16_supported: bool) -> Precision:
    """The half precision a GPU actor loads its weights in: bf16 where the GPU has it
    (Ampere and later), else fp16, which every CUDA GPU runs.

    >>> gpu_half_precision("bf16", bf16_supported=False), gpu_half_precision("fp16",
    ...     bf16_supported=True), gpu_half_precision("bf16", bf16_supported=True)
    ('fp16', 'fp16', 'bf16')
    """
    return "bf16" if precision == "bf16" and bf16_supported else "fp16"


def pick_device(device: Device) -> str:
    """'auto' means CUDA when torch sees a GPU, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but torch sees no GPU")
    return device


_ALTERNATING: dict[type, np.ndarray] = {}
"""1, 0, 1, 0, ... per dtype, grown as blocks need (`_alternating`)."""


def _alternating(count: int, dtype: type) -> np.ndarray:
    """`count` values 1, 0, 1, 0, ... in `dtype`: the real/padding pattern of the runs a
    `PaddedBlock` repeats into its mask. Kept between blocks, so a block pays a slice,
    not a tile.

    >>> _alternating(5, np.int8).tolist()
    [1, 0, 1, 0, 1]
    """
    pattern = _ALTERNATING.get(dtype)
    if pattern is None or len(pattern) < count:
        pattern = _ALTERNATING[dtype] = np.tile(np.array([1, 0], dtype), max(count, 2048))
    return pattern[:count]


class PaddedBlock:
    """A block's token ids padded once, for all its batches: each batch's right-padded
    (rows, width) matrix lies in one flat buffer after the previous one, with a flat
    mask of real tokens beside it. Built in a fixed number of numpy steps over the whole
    block (no loop per row; the loop per batch runs on Python ints), so a batch is a few
    views, and a GPU actor copies the whole block to the device in one go. After a
    forward pass every call runs with cold caches, so the count of steps is the cost.

    Rows are sorted longest first (`order`); `lengths` holds their token counts in that
    order, and batch k is positions `cuts[k][0]:cuts[k][1]` of it, `shapes[k]` padded.

    >>> o, v = _offsets_and_values([[1, 2, 3], [4], [5, 6]])
    >>> b = PaddedBlock(o, v, batch_tokens=4, pad_id=0)
    >>> [(b.order[i:j].tolist(), ids.tolist()) for i, j, ids in b.batches(b.ids)]
    [([0], [[1, 2, 3]]), ([2, 1], [[5, 6], [4, 0]])]
    >>> b.real.astype(int).tolist(), b.lengths.tolist(), b.shapes
    ([1, 1, 1, 1, 1, 1, 0], [3, 2, 1], [(1, 3), (2, 2)])
    """

    def __init__(self, offsets: np.ndarray, values: np.ndarray, *, batch_tokens: int,
                 pad_id: int,
                 buffers: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> None:
        self.row_lengths = np.diff(offsets)
        """Each row's token count, in input order."""
        self.order, self.cuts = budget_cuts(self.row_lengths, batch_tokens=batch_tokens)
        self.lengths = self.row_lengths[self.order]
        self.shapes = [(b - a, w) for a, b, w in self.cuts]
        self.sizes = [r * w for r, w in self.shapes]
        """Padded tokens of each batch, one after the other in the flat buffers."""
        size, n = sum(self.sizes), len(self.order)
        ids, real = ((np.empty(size, np.int64), None) if buffers is None else buffers(size))
        # Each sorted row is a run of real tokens, then a run of padding to its batch's
        # width: the mask is one repeat over those alternating runs.
        runs = np.empty(2 * n, np.int64)
        runs[0::2] = self.lengths
        runs[1::2] = np.repeat([w for _, w in self.shapes], [r for r, _ in self.shapes])
        runs[1::2] -= self.lengths
        self._runs = runs
        mask = np.repeat(_alternating(2 * n, np.bool_), runs)
        if real is None:
            self.real = mask
        else:
            self.real = real[:size]
            self.real[:] = mask
        # The ids of the sorted rows, one after the other, fill the real positions in order.
        ends = np.cumsum(self.lengths)
        source = np.arange(int(ends[-1]) if n else 0)
        source += np.repeat(offsets[self.order] - ends + self.lengths, self.lengths)
        self.ids = ids[:size]
        self.ids.fill(pad_id)
        self.ids[mask] = values[source]

    def weights(self) -> np.ndarray:
        """The flat mask as float32 (1 on real tokens), for mean pooling's matmul: one
        repeat, like the mask, where a cast of the mask tensor is a heavier dispatch."""
        return np.repeat(_alternating(len(self._runs), np.float32), self._runs)

    def batches(self, *flats) -> Iterator[tuple[Any, ...]]:
        """(start, stop, one view per flat) per batch: positions start:stop of the sorted
        rows, and each flat array laid out as this block's ids (numpy arrays, or tensors
        on a device) as that batch's (rows, width) matrix."""
        start = 0
        for (a, b, _), shape, size in zip(self.cuts, self.shapes, self.sizes, strict=True):
            yield (a, b, *(flat[start:start + size].reshape(shape) for flat in flats))
            start += size


class PinnedStaging:
    """The pinned host buffer a GPU actor pads each block into, and the block's copy to
    the device: ids and mask go over in one `non_blocking` copy each per block, and the
    batches are views of them there. The buffer is reused for the next block only once
    its copy has finished (a CUDA event), and grows when a block needs more room.

    One copy per block, on the compute stream: a 1,024-row block of 256-token chunks is
    2 MB of ids, well under a millisecond over PCIe, against the block's forward passes
    that follow it, so a side stream would overlap almost nothing. What matters is that
    the host never waits for the device inside a block. On a CPU device (the tests) the
    same code runs with a plain buffer and no events.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self._cuda = device.startswith("cuda")
        self._ids: Any = None
        self._real: Any = None
        self._copied: Any = None

    def buffers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Host buffers for at least `size` ids and mask values, free to write into."""
        import torch

        if self._copied is not None:
            self._copied.synchronize()  # the last block's copies have left the buffers
            self._copied = None
        if self._ids is None or self._ids.numel() < size:
            self._ids = torch.empty(max(size, 1), dtype=torch.int64)
            self._real = torch.empty(max(size, 1), dtype=torch.bool)
            if self._cuda:
                self._ids, self._real = self._ids.pin_memory(), self._real.pin_memory()
        return self._ids.numpy(), self._real.numpy()

    def to_device(self, ids: np.ndarray, real: np.ndarray) -> tuple[Any, Any]:
        """The block's flat ids and mask (views of `buffers`), on the device (queued)."""
        import torch

        host_ids, host_real = torch.from_numpy(ids), torch.from_numpy(real)
        if not self._cuda:  # the buffers are the tensors: hand out copies they outlive
            return host_ids.clone(), host_real.clone()
        on_device = (host_ids.to(self.device, non_blocking=True),
                     host_real.to(self.device, non_blocking=True))
        self._copied = torch.cuda.Event()
        self._copied.record()
        return on_device


class Embedder:
    """Load a model once and embed batches of chunk rows.

    Args:
        info: The resolved model (folder, pooling, normalisation, dim).
        precision: fp32, or bf16/fp16: on a GPU the weights load in that precision (bf16
            falls back to fp16 where the GPU lacks it); on CPU bf16 runs as autocast.
        device: 'auto', 'cpu' or 'cuda'.
        batch_tokens: Padded tokens per forward pass; None picks the device's default.
        torch_threads: CPU threads for this process; None leaves torch's default.
        trust_remote_code: Passed to transformers; off unless the spec sets it.
        codebook: The codecs `__call__` stores; None means full-size float32 `vector`.
    """

    def __init__(self, info: ModelInfo, *, precision: Precision = "fp32",
                 device: Device = "auto", batch_tokens: int | None = None,
                 torch_threads: int | None = None, trust_remote_code: bool = False,
                 codebook: Codebook | None = None) -> None:
        init_started = time.perf_counter()
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per actor start is noise in job logs
        if torch_threads is not None:
            # Ray sets OMP_NUM_THREADS=1 in workers; size torch to the cores we were given.
            torch.set_num_threads(torch_threads)
        self.info = info
        self.device = pick_device(device)
        if precision == "fp16" and self.device == "cpu":
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        half = self.device == "cuda" and precision in ("bf16", "fp16")
        if half:  # weights in half precision: half the memory, no autocast casts
            chosen = gpu_half_precision(precision, bf16_supported=torch.cuda.is_bf16_supported())
            if chosen != precision:
                print(f"[quiver] embed: this GPU has no bf16; running {chosen} instead",
                      file=sys.stderr, flush=True)
            precision = chosen
        self.precision = precision
        self.batch_tokens = batch_tokens or DEFAULT_BATCH_TOKENS[self.device]
        self.codebook = codebook or Codebook(("float32",), info.dim, renormalize=False)
        has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(info.path))
        dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.model = AutoModel.from_pretrained(
            info.path, trust_remote_code=trust_remote_code, use_safetensors=has_safetensors,
            **({"dtype": dtypes[precision]} if half else {}),
        )
        self.model.eval().to(self.device)
        self.attention = getattr(self.model.config, "_attn_implementation", None)
        """The attention kernel transformers chose (SDPA by default where the model has
        it): its fused kernels are the fast path, so another one is said in the log."""
        if self.attention != "sdpa":
            print(f"[quiver] embed: {info.name} runs {self.attention!r} attention, not "
                  "SDPA; expect it slower on a GPU", file=sys.stderr, flush=True)
        # Padded positions are masked out, so any id works; the config saves loading a
        # tokenizer in every actor.
        pad_id = getattr(self.model.config, "pad_token_id", None)
        if pad_id is None:
            pad_id = load_tokenizer(info.path, trust_remote_code).pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0
        # On CPU, bf16 runs as autocast over fp32 weights (fast where the CPU has bf16).
        self._autocast_dtype = None if half else dtypes.get(precision)
        self.seconds = {"forward": 0.0, "pool": 0.0}
        """Seconds spent in the forward pass and in pooling since the last `__call__`."""
        self.forward_batches = 0
        """Forward passes so far (the job's metrics read it)."""
        self.oom_retries = 0
        """Batches that ran out of GPU memory and were retried in halves."""
        self._marks: list[tuple[str, Any]] = []
        self._staging = PinnedStaging(self.device) if self.device == "cuda" else None
        self.load_id = f"{os.getpid()}:{time.time_ns()}:{time.perf_counter() - init_started:.3f}"
        """Names this model load (`pid:unix ns when ready:seconds the load took`, imports
        of torch and transformers included); the job counts distinct ones (model loads
        per job) and reads when the first was ready (`load_times`)."""
        self._load_dictionary = pa.array([self.load_id])
        self._zeros = pa.array(np.zeros(0, np.int32))
        """Dictionary indices of `LOADED_BY` (all 0), sliced for each block."""
        self._use_codebook(self.codebook)

    def with_codebook(self, codebook: Codebook) -> Embedder:
        """This loaded model storing another table's codecs: a shallow copy sharing the
        weights (what a long-lived embed actor hands each job, `jobs._embed_service`)."""
        other = copy.copy(self)
        other.seconds = {"forward": 0.0, "pool": 0.0}
        other._marks = []
        other._use_codebook(codebook)
        return other

    def _use_codebook(self, codebook: Codebook) -> None:
        """The output columns `codebook` stores, and the schemas cached per block."""
        self.codebook = codebook
        vector_fields = self.codebook.fields()
        self._stored = [(f.name, f.type) for f in vector_fields]
        """(name, fixed-size list type) of each stored vector column, in the table's order."""
        self._schema_in: pa.Schema | None = None
        self._schema_out: pa.Schema | None = None
        self._drop = -1
        """The last block's schema, the output schema it gives, and where its `input_ids`
        column is."""
        self._added_fields = [*vector_fields,
            pa.field("_tokens", pa.int32()),
            *(pa.field(STAGE_COLUMNS[s], pa.float64()) for s in ("forward", "pool", "quantize")),
            pa.field(EMBEDDED_AT, pa.float64()),
            pa.field(LOADED_BY, pa.dictionary(pa.int32(), pa.string()))]
        """The columns `__call__` adds after the block's own, in order."""

    def _block_vectors(self, input_ids: Sequence[Sequence[int]] | pa.Array | pa.ChunkedArray
                       ) -> tuple[PaddedBlock, Any]:
        """Every row's pooled (and normalised) vector, on the device, longest row first,
        and the padded block, whose `order` says which row each one is.

        The block is padded once, straight from the list column's offsets and values
        (`PaddedBlock`): a Python loop per row, or numpy work per batch, is what a GPU
        would wait on. On a GPU the padded block goes over in one copy, and nothing here
        waits for the device: batches queue on it and pool into one block-sized result,
        and the caller syncs once per block. A batch that runs out of GPU memory is
        halved and retried, and the budget halved for the blocks after it
        (`_halve_budget`); a single row that does not fit still fails.
        """
        import torch

        offsets, values = _offsets_and_values(input_ids)
        staging, mode = self._staging, self.info.pooling
        block = PaddedBlock(offsets, values, batch_tokens=self.batch_tokens, pad_id=self.pad_id,
                            buffers=None if staging is None else staging.buffers)
        if staging is None:
            ids, real = torch.from_numpy(block.ids), torch.from_numpy(block.real)
        else:
            ids, real = staging.to_device(block.ids, block.real)
        counts = None  # real tokens per sorted row, where pooling needs them on the device
        if mode == "lasttoken" or (mode == "mean" and not self.info.normalize):
            counts = torch.from_numpy(block.lengths.astype(np.float32)).to(self.device)
        n, dim = len(block.order), self.info.dim
        with torch.inference_mode():
            out = torch.empty((n, 1, dim), dtype=torch.float32, device=self.device)
            if n == 0:
                return block, out.view(n, dim)
            if mode != "mean":
                weights = real
            elif staging is None:
                weights = torch.from_numpy(block.weights())
            else:  # on the device, from the mask already there
                weights = real.to(torch.float32)
            # Every batch's views at once, before the first forward: made in a burst they
            # run warm, where between forward passes each call would run cold.
            rows = [r for r, _ in block.shapes]
            parts = [t.split(block.sizes) for t in (ids, real, weights)]
            batches = [(i.view(r, w), m.view(r, w), x.view(r, 1, w), c, o)
                       for i, m, x, c, o, (r, w) in zip(
                           *parts, [None] * len(rows) if counts is None else counts.split(rows),
                           out.split(rows), block.shapes, strict=True)]
            self.forward_batches += len(batches)
            for batch in batches:
                try:
                    self._batch(*batch)
                except torch.cuda.OutOfMemoryError as error:
                    self._in_halves(batch, error)
            out = out.view(n, dim)
            if mode == "mean" and counts is not None:
                out = mean_of_sums(out, counts)
            if self.info.normalize:  # row-wise, so once per block rather than per batch
                out = out / torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_(min=1e-12)
        return block, out

    def _in_halves(self, batch: tuple, error: Exception) -> None:
        """Run a batch that ran out of GPU memory as two halves (each halved again if it
        fails too), after halving the budget for the blocks to come; a single row that
        does not fit fails with the original error."""
        import torch

        rows = len(batch[0])
        if rows == 1:
            raise error
        self._halve_budget(rows, batch[0].numel())
        h = rows // 2  # the first half runs first
        for half in ([None if x is None else x[:h] for x in batch],
                     [None if x is None else x[h:] for x in batch]):
            try:
                self._batch(*half)
            except torch.cuda.OutOfMemoryError as again:
                self._in_halves(tuple(half), again)

    def _halve_budget(self, rows: int, tokens: int) -> None:
        """After an out-of-memory error on a batch of `tokens` padded tokens: free the
        cache, and keep the budget under half of that batch. Batches cut under the old
        budget that fail the same way leave it as it is, so it shrinks with what fails,
        not with how often."""
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.batch_tokens = max(1, min(self.batch_tokens, tokens // 2))
        self.oom_retries += 1
        print(f"[quiver] embed: out of GPU memory on a batch of {rows} rows; retrying it in "
              f"halves, batch_tokens now {self.batch_tokens}", file=sys.stderr, flush=True)

    def _batch(self, ids, mask, weights, counts, out) -> None:
        """Run one padded batch (ids and bool mask on the device) and pool it into `out`,
        its rows of the block's result (`pool_into`: `weights` and `counts` as it needs).

        On CPU the stage clocks are read here; on a GPU the work is only queued, and
        CUDA events mark the stages (`_clock`), read once the block is done.
        """
        import torch

        self._clock("start")
        if self._autocast_dtype is None:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            with torch.autocast(device_type=self.device, dtype=self._autocast_dtype):
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        self._clock("forward")
        pool_into(out, hidden, weights, counts, mode=self.info.pooling)
        self._clock("pool")

    def _clock(self, stage: str) -> None:
        """Mark the end of a stage: a host clock on CPU, a CUDA event on a GPU (reading
        a host clock there would need a sync per batch)."""
        if self.device == "cuda":
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append((stage, event))
        else:
            self._marks.append((stage, time.perf_counter()))

    def _read_clocks(self) -> None:
        """Add the marked stages to `seconds`; on a GPU, after the block's one sync."""
        last = None
        for stage, mark in self._marks:
            if stage != "start" and last is not None:
                spent = last.elapsed_time(mark) / 1000 if self.device == "cuda" else mark - last
                self.seconds[stage] += spent
            last = mark
        self._marks = []

    def embed_ids(self, input_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed token id lists; returns (n, dim) float32 in input order, full size."""
        out = np.empty((len(input_ids), self.info.dim), dtype=np.float32)
        block, vectors = self._block_vectors(input_ids)
        out[block.order] = vectors.cpu().numpy()  # the block's one wait for the device
        self._read_clocks()
        return out

    def encode_ids(self, input_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Embed and encode with the codebook on the device, bringing each stored column
        back to the host once per block; one matrix per stored column, in input order."""
        return self._encoded(input_ids)[0]

    def _encoded(self, input_ids) -> tuple[dict[str, np.ndarray], PaddedBlock]:
        """`encode_ids`, and the padded block (its `row_lengths` are the token counts)."""
        block, vectors = self._block_vectors(input_ids)
        out = {}
        for column, matrix in encode(vectors, self.codebook).items():  # the block's one wait
            out[column] = np.empty_like(matrix)
            out[column][block.order] = matrix
        self._read_clocks()
        return out, block

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Replace `input_ids` by the codebook's vector columns (fixed-size lists).

        Work columns for the job summary ride along, and the writer drops them: `_tokens`
        (each row's token count), the row's share of this block's forward, pool and
        quantize seconds, and when the block left this actor. After a forward pass every
        Arrow call runs with cold caches, so the table is built in one step, from as few
        arrays as hold it (the work columns are slices of one).
        """
        started = time.perf_counter()
        self.seconds = {"forward": 0.0, "pool": 0.0}
        encoded, block = self._encoded(batch.column("input_ids"))
        rows, schema = batch.num_rows, batch.schema
        if self._schema_in is None or not schema.equals(self._schema_in):
            self._schema_in, self._drop = schema, schema.get_field_index("input_ids")
            kept = [f for i, f in enumerate(schema) if i != self._drop]
            self._schema_out = pa.schema(kept + self._added_fields)
        arrays = batch.columns
        del arrays[self._drop]
        arrays += [fixed_size_list(encoded[name], typ) for name, typ in self._stored]
        arrays.append(pa.array(block.row_lengths.astype(np.int32)))
        forward, pooling = self.seconds["forward"], self.seconds["pool"]
        quantize = time.perf_counter() - started - forward - pooling  # the rest of this call
        share = 1 / max(rows, 1)  # each row's share, in `_added_fields`' order
        arrays += constant_columns(rows, [forward * share, pooling * share, quantize * share,
                                          time.time()])
        if len(self._zeros) < rows:
            self._zeros = pa.array(np.zeros(rows, np.int32))
        arrays.append(pa.DictionaryArray.from_arrays(self._zeros.slice(0, rows),
                                                     self._load_dictionary, safe=False))
        return pa.Table.from_arrays(arrays, schema=self._schema_out)


def load_times(load_ids: list[str]) -> tuple[float, float] | None:
    """(unix time the first load was ready, the seconds it took) from `Embedder.load_id`s,
    None when there are none.

    >>> load_times(["7:3000000000:2.500", "8:2000000000:4.000"])
    (2.0, 4.0)
    """
    parsed = [(int(parts[1]) / 1e9, float(parts[2])) for parts in
              (i.split(":") for i in load_ids) if len(parts) == 3]
    return min(parsed) if parsed else None


QueryKind = Literal["query", "document"]


class TextEncoder:
    """Embed raw strings (queries) the way the table's documents were embedded."""

    def __init__(self, embedder: Embedder, *, trust_remote_code: bool = False) -> None:
        self.embedder = embedder
        self._tok = load_tokenizer(embedder.info.path, trust_remote_code)

    def encode(self, texts: Sequence[str], *, kind: QueryKind = "query") -> np.ndarray:
        """Tokenize with the model's prefix, truncate to its max tokens, and embed."""
        info = self.embedder.info
        prefix = info.query_prefix if kind == "query" else info.document_prefix
        encoded = self._tok(
            [prefix + t for t in texts], truncation=True, max_length=info.max_tokens,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return self.embedder.embed_ids(encoded["input_ids"])
