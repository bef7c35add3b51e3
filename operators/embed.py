"""Embedding inference: token ids in, pooled (and normalised) vectors out.

The embedder is a callable class so that Ray Data can hold one per actor: `__init__`
loads the model once, `__call__` maps a batch of chunk rows to the same rows with a
`vector` column. Inputs are sorted by length and cut into batches under a padded-token
budget, so a batch of short chunks is wide and a batch of long ones is narrow, and
padding stays small.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from operators.model import ModelInfo, load_tokenizer
from operators.quantize import Codebook, empty_matrix, encode, to_arrow
from operators.timing import EMBEDDED_AT, LOADED_BY, with_stage_seconds
from schemas.kinds import Device, Pooling, Precision, PrecisionChoice
from schemas.records import CODEC_COLUMNS, codec_fields


def _offsets_and_values(input_ids) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of token id lists: an Arrow list column, or Python lists.

    >>> o, v = _offsets_and_values([[1, 2], [3]])
    >>> o.tolist(), v.tolist()
    ([0, 2, 3], [1, 2, 3])
    """
    if isinstance(input_ids, pa.ChunkedArray):
        input_ids = input_ids.combine_chunks()
    if not isinstance(input_ids, pa.Array):
        input_ids = pa.array(list(input_ids), pa.list_(pa.int64()))
    if len(input_ids) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    offsets = input_ids.offsets.to_numpy().astype(np.int64)
    return offsets, input_ids.values.to_numpy(zero_copy_only=False)


def budget_cuts(lengths: np.ndarray, *, batch_tokens: int
                ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Row order, longest first, and the (start, stop) of each batch in that order, so
    each batch's padded size fits the budget. Sorted, a batch led by a row of width w
    holds budget // w rows, so the loop runs once per batch, not per row; a single row
    longer than the budget still gets a batch of its own.

    >>> budget_cuts(np.array([5, 1, 3, 4]), batch_tokens=8)
    (array([0, 3, 2, 1]), [(0, 1), (1, 3), (3, 4)])
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    widths = np.asarray(lengths)[order]
    cuts, start, n = [], 0, len(order)
    while start < n:
        width = int(widths[start])
        stop = n if width == 0 else min(n, start + max(1, batch_tokens // width))
        cuts.append((start, stop))
        start = stop
    return order, cuts


def token_budget_batches(lengths: Sequence[int], *, batch_tokens: int) -> list[list[int]]:
    """Row indices per batch, longest first (`budget_cuts` as lists).

    >>> token_budget_batches([5, 1, 3, 4], batch_tokens=8)
    [[0], [3, 2], [1]]
    """
    order, cuts = budget_cuts(np.asarray(lengths, np.int64), batch_tokens=batch_tokens)
    return [order[a:b].tolist() for a, b in cuts]


def pool(hidden, mask, *, mode: Pooling):
    """Pool token states to one vector per input, in float32.

    Args:
        hidden: (batch, seq, dim) token states, any float dtype.
        mask: (batch, seq) attention mask of 0/1.
        mode: mean over real tokens, the first token, or the last real token.
    """
    import torch

    hidden = hidden.float()  # accumulate in fp32 whatever the model ran in
    if mode == "mean":  # one batched matmul: (batch, 1, seq) @ (batch, seq, dim)
        m = mask.to(hidden.dtype)
        summed = torch.bmm(m.unsqueeze(1), hidden).squeeze(1)
        return summed / m.sum(dim=1, keepdim=True).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1).long() - 1  # right padding: last real token per row
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"Got {mode!r} for pooling. Must be one of mean, cls, lasttoken.")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
"""Padded tokens per forward pass. On CPU, 4096 ran 3% faster than 8192 in a one-thread
actor and pads less. A GPU needs wide batches to fill its cores: 32,768 tokens (128
full 256-token chunks) keeps a data-center GPU (A100, H100) busy on BERT-sized models
while using well under 1 GB for activations; a smaller GPU that runs out of memory
halves the batch and goes on (`Embedder._halve_budget`)."""


CPU_ROWS_PER_BLOCK = 128
"""Chunks a CPU actor gets at once: small blocks keep every actor busy to the end, and
128 still leaves padding at 3-5% on SciFact."""
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


class PaddedBlock:
    """A block's token ids padded once, for all its batches: each batch's right-padded
    (rows, width) matrix lies in one flat buffer after the previous one, with a flat
    mask of real tokens beside it. Built in a fixed number of numpy steps over the whole
    block (no loop per row, none per batch), so a batch is two views; a GPU actor copies
    the whole block to the device in one go.

    >>> o, v = _offsets_and_values([[1, 2, 3], [4], [5, 6]])
    >>> b = PaddedBlock(o, v, batch_tokens=4, pad_id=0)
    >>> [(rows.tolist(), ids.tolist()) for rows, ids, _ in b.batches(b.ids, b.real)]
    [([0], [[1, 2, 3]]), ([2, 1], [[5, 6], [4, 0]])]
    """

    def __init__(self, offsets: np.ndarray, values: np.ndarray, *, batch_tokens: int,
                 pad_id: int,
                 buffers: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = None
                 ) -> None:
        lengths = np.diff(offsets)
        self.order, self.cuts = budget_cuts(lengths, batch_tokens=batch_tokens)
        sorted_lengths = lengths[self.order]
        first = np.array([a for a, _ in self.cuts], np.int64)
        rows_in = np.array([b - a for a, b in self.cuts], np.int64)
        self.widths = sorted_lengths[first] if len(first) else first
        self.starts = np.concatenate([[0], np.cumsum(rows_in * self.widths)])
        size = int(self.starts[-1])
        batch_of = np.repeat(np.arange(len(self.cuts)), rows_in)  # per sorted row
        row_start = (self.starts[:-1][batch_of]
                     + (np.arange(len(self.order)) - first[batch_of]) * self.widths[batch_of])
        total = int(sorted_lengths.sum())
        within = np.arange(total) - np.repeat(np.cumsum(sorted_lengths) - sorted_lengths,
                                              sorted_lengths)
        dest = np.repeat(row_start, sorted_lengths) + within
        ids, real = ((np.empty(size, np.int64), np.empty(size, bool)) if buffers is None
                     else buffers(size))
        self.ids, self.real = ids[:size], real[:size]
        self.ids.fill(pad_id)
        self.real.fill(False)
        self.ids[dest] = values[np.repeat(offsets[self.order], sorted_lengths) + within]
        self.real[dest] = True

    def batches(self, ids, real) -> Iterator[tuple[np.ndarray, Any, Any]]:
        """(row indices, (rows, width) ids, mask) per batch, as views of flat `ids` and
        `real` laid out as this block's (numpy arrays, or their copies on a device)."""
        for (a, b), width, start in zip(self.cuts, self.widths, self.starts[:-1], strict=True):
            shape = (b - a, int(width))
            stop = start + shape[0] * shape[1]
            yield self.order[a:b], ids[start:stop].reshape(shape), real[start:stop].reshape(shape)


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
        self._marks: list[tuple[str, Any]] = []
        self._staging = PinnedStaging(self.device) if self.device == "cuda" else None
        self.load_id = f"{os.getpid()}:{time.time_ns()}"
        """Names this model load; the job counts distinct ones (model loads per job)."""

    def _forward(self, input_ids: Sequence[Sequence[int]] | pa.Array | pa.ChunkedArray
                 ) -> Iterator[tuple[np.ndarray, Any]]:
        """Yield (row indices, pooled vectors on the device) per token-budget batch.

        The block is padded once, straight from the list column's offsets and values
        (`PaddedBlock`): a Python loop per row, or numpy work per batch, is what a GPU
        would wait on. On a GPU the padded block goes over in one copy, and nothing here
        waits for the device: batches queue on it and the caller syncs once per block. A
        batch that runs out of GPU memory is halved and retried, and the budget halved
        for the blocks after it (`_halve_budget`); a single row that does not fit still
        fails.
        """
        import torch

        offsets, values = _offsets_and_values(input_ids)
        staging = self._staging
        block = PaddedBlock(offsets, values, batch_tokens=self.batch_tokens, pad_id=self.pad_id,
                            buffers=None if staging is None else staging.buffers)
        if staging is None:
            ids, real = torch.from_numpy(block.ids), torch.from_numpy(block.real)
        else:
            ids, real = staging.to_device(block.ids, block.real)
        with torch.inference_mode():
            for batch in block.batches(ids, real):
                todo = [batch]
                while todo:
                    rows, batch_ids, mask = todo.pop()
                    try:
                        vectors = self._batch(batch_ids, mask)
                    except torch.cuda.OutOfMemoryError:
                        if len(rows) == 1:
                            raise
                        self._halve_budget(len(rows), batch_ids.numel())
                        h = len(rows) // 2  # the first half runs first
                        todo += [(rows[h:], batch_ids[h:], mask[h:]),
                                 (rows[:h], batch_ids[:h], mask[:h])]
                        continue
                    yield rows, vectors

    def _halve_budget(self, rows: int, tokens: int) -> None:
        """After an out-of-memory error on a batch of `tokens` padded tokens: free the
        cache, and keep the budget under half of that batch. Batches cut under the old
        budget that fail the same way leave it as it is, so it shrinks with what fails,
        not with how often."""
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.batch_tokens = max(1, min(self.batch_tokens, tokens // 2))
        print(f"[quiver] embed: out of GPU memory on a batch of {rows} rows; retrying it in "
              f"halves, batch_tokens now {self.batch_tokens}", file=sys.stderr, flush=True)

    def _batch(self, ids, mask):
        """Pooled vectors of one padded batch (ids and bool mask on the device), in fp32.

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
        vectors = pool(hidden, mask, mode=self.info.pooling)  # (batch, dim) fp32
        self._clock("pool")
        return vectors

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

    def _block_vectors(self, input_ids) -> tuple[np.ndarray, Any]:
        """Every row's pooled (and normalised) vector, on the device, with the row order
        they come in."""
        import torch

        order, parts = [], []
        for rows, vectors in self._forward(input_ids):
            order.append(rows)
            parts.append(vectors)
        if not parts:
            return np.zeros(0, np.int64), torch.zeros((0, self.info.dim), device=self.device)
        vectors = torch.cat(parts)
        if self.info.normalize:  # row-wise, so once per block rather than per batch
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
        return np.concatenate(order), vectors

    def embed_ids(self, input_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Embed token id lists; returns (n, dim) float32 in input order, full size."""
        out = np.empty((len(input_ids), self.info.dim), dtype=np.float32)
        order, vectors = self._block_vectors(input_ids)
        out[order] = vectors.cpu().numpy()  # the block's one wait for the device
        self._read_clocks()
        return out

    def encode_ids(self, input_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Embed and encode with the codebook on the device, bringing each stored column
        back to the host once per block; one matrix per stored column."""
        book = self.codebook
        out = {CODEC_COLUMNS[c]: empty_matrix(c, book.dims, len(input_ids)) for c in book.codecs}
        order, vectors = self._block_vectors(input_ids)
        for column, matrix in encode(vectors, book).items():  # the block's one wait
            out[column][order] = matrix
        self._read_clocks()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Replace `input_ids` by the codebook's vector columns (fixed-size lists).

        Work columns for the job summary ride along, and the writer drops them: `_tokens`
        (each row's token count), the row's share of this block's forward, pool and
        quantize seconds, and when the block left this actor.
        """
        started = time.perf_counter()
        self.seconds = {"forward": 0.0, "pool": 0.0}
        encoded = self.encode_ids(batch.column("input_ids"))
        tokens = pa.compute.list_value_length(batch.column("input_ids")).cast(pa.int32())
        keep = batch.drop_columns(["input_ids"])
        for field in codec_fields(list(self.codebook.codecs), self.codebook.dims):
            codec = next(c for c in self.codebook.codecs if CODEC_COLUMNS[c] == field.name)
            keep = keep.append_column(field, to_arrow(encoded[field.name], codec,
                                                      self.codebook.dims))
        keep = keep.append_column("_tokens", tokens)
        spent = time.perf_counter() - started
        keep = with_stage_seconds(keep, **self.seconds,
                                  quantize=spent - sum(self.seconds.values()))
        keep = keep.append_column(
            EMBEDDED_AT, pa.array(np.full(keep.num_rows, time.time()), pa.float64()))
        return keep.append_column(LOADED_BY, pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(keep.num_rows, np.int32)), pa.array([self.load_id])))


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
