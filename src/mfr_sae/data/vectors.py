"""Bring your own vectors: a `.npy` file (memory-mapped), a `.safetensors` file, or a folder of such
shards, each [n_vectors, d]; read lazily, never loaded whole.

The shards are one virtual array of rows. The last `holdout` rows are kept out of training for
evaluation. Training rows are cut into chunks of contiguous rows (cheap reads); every epoch draws a
seeded order of the chunks, a shuffle buffer takes `chunks_per_buffer` chunks at a time and permutes
their rows (seeded), and batches are consecutive slices of that stream. The stream is a function of
(seed, step), so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from mfr_sae.seeding import BUFFER_STREAM, CHUNK_ORDER_STREAM, seeded_generator

SUFFIXES = (".npy", ".safetensors")
FLOAT_DTYPES = {"float16", "float32", "float64", "bfloat16", "F16", "F32", "F64", "BF16"}


class DataError(ValueError):
    """Input vectors are unusable; the message names the file (and the row, for NaN or inf)."""


NPY_MAGIC = b"\x93NUMPY"
NPY_HELP = "save a floating-point array [n_vectors, d] with numpy.save"


def _check_npy(path: Path) -> None:
    """Refuse a .npy name on anything but a numpy array of plain values (numpy would ask for allow_pickle)."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise DataError(
                f"{path}: not a numpy array file (.npy): it does not start with the .npy header "
                f"(a pickle, text or another format under a .npy name?); {NPY_HELP}"
            )
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if read_header is None:  # a newer header version: np.load judges it
                return
            _, _, dtype = read_header(f)
        except (ValueError, OSError, SyntaxError) as err:
            raise DataError(
                f"{path}: not a numpy array file (.npy): corrupt header ({str(err).splitlines()[0][:120]}); {NPY_HELP}"
            ) from None
    if dtype.hasobject:
        raise DataError(
            f"{path}: not a numpy array file (.npy) of numbers: it holds Python objects, which "
            f"numpy stores as a pickle and which are not read here; {NPY_HELP}"
        )


class _SafetensorsSlice(Protocol):
    """The methods of a safetensors slice used here, typed (safetensors' stub leaves them unannotated)."""

    def get_shape(self) -> list[int]: ...

    def get_dtype(self) -> str: ...

    def __getitem__(self, rows: slice) -> Tensor: ...


class _SafetensorsFile(Protocol):
    """The methods of a file opened with safetensors' safe_open used here, typed (its stub leaves them unannotated)."""

    def keys(self) -> list[str]: ...

    def get_slice(self, name: str) -> _SafetensorsSlice: ...


class _ShardFile:
    """One file of vectors, read by row ranges."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".npy":
                _check_npy(path)
                self._array = np.load(path, mmap_mode="r", allow_pickle=False)
                shape, dtype = self._array.shape, str(self._array.dtype)
            else:
                file: _SafetensorsFile = safe_open(path, "pt")
                self._file = file
                keys = list(file.keys())
                if len(keys) != 1:
                    raise DataError(f"{path}: expected one tensor, found {len(keys)} ({', '.join(keys[:5])})")
                self._slice = file.get_slice(keys[0])
                shape, dtype = tuple(self._slice.get_shape()), self._slice.get_dtype()
        except (ValueError, OSError, SafetensorError) as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{path}: cannot read vectors ({str(err).splitlines()[0]})") from None
        if len(shape) != 2:
            raise DataError(f"{path}: expected a 2-D array [n_vectors, d], got shape {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise DataError(f"{path}: expected floating-point vectors, got dtype {dtype}")
        if shape[0] == 0:
            raise DataError(f"{path}: holds no vectors")
        self.rows, self.d = shape

    def read(self, start: int, stop: int) -> Tensor:
        if self.path.suffix == ".npy":
            return torch.from_numpy(np.array(self._array[start:stop], dtype=np.float32))
        return self._slice[start:stop].float()


def find_shards(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not shards:
            raise DataError(f"{path}: no .npy or .safetensors files in this folder")
        return shards
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: expected a .npy or .safetensors file, or a folder of them")
    return [path]


class VectorsData:
    """Vectors from files, shuffled in a seeded buffer; `holdout` rows at the end for evaluation."""

    ground_truth = None

    def __init__(
        self,
        path: str | Path,
        seed: int = 0,
        holdout: int = 10_000,
        shuffle_buffer: int = 131_072,
        chunks_per_buffer: int = 8,
    ):
        self.shards = [_ShardFile(p) for p in find_shards(path)]
        dims = {s.d for s in self.shards}
        if len(dims) > 1:
            raise DataError(f"{path}: shards differ in d ({', '.join(f'{s.path.name}: {s.d}' for s in self.shards)})")
        self.d = dims.pop()
        self._starts = np.cumsum([0] + [s.rows for s in self.shards])
        total = int(self._starts[-1])
        if holdout >= total:
            raise DataError(f"{path}: {total} vectors, not more than data.holdout={holdout}")
        self.n_train, self.holdout, self.seed = total - holdout, holdout, seed
        self.chunk_rows = max(1, min(shuffle_buffer // chunks_per_buffer, self.n_train))
        self.chunks_per_buffer = chunks_per_buffer
        self.n_chunks = -(-self.n_train // self.chunk_rows)

    def read_rows(self, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the virtual array, across shard boundaries, checked for NaN/inf."""
        parts = []
        for shard, first in zip(self.shards, self._starts[:-1]):
            lo, hi = max(start, first), min(stop, first + shard.rows)
            if lo < hi:
                part = shard.read(int(lo - first), int(hi - first))
                bad = ~torch.isfinite(part).all(dim=1)
                if bad.any():
                    row = int(lo - first) + int(bad.nonzero()[0])
                    raise DataError(f"{shard.path}: row {row} holds NaN or inf")
                parts.append(part)
        return torch.cat(parts)

    def _chunk_order(self, epoch: int) -> list[int]:
        return torch.randperm(self.n_chunks, generator=seeded_generator(self.seed, CHUNK_ORDER_STREAM, epoch)).tolist()

    def _chunk_range(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.n_train)

    def _buffer_chunks(self, epoch: int) -> list[list[int]]:
        """The chunks of each buffer of an epoch."""
        order = self._chunk_order(epoch)
        return [order[i : i + self.chunks_per_buffer] for i in range(0, self.n_chunks, self.chunks_per_buffer)]

    def _buffer(self, epoch: int, index: int, chunks: list[int]) -> Tensor:
        """Buffer `index` of `epoch`: its chunks' rows, permuted."""
        rows = torch.cat([self.read_rows(*self._chunk_range(c)) for c in sorted(chunks)])
        return rows[torch.randperm(len(rows), generator=seeded_generator(self.seed, BUFFER_STREAM, epoch, index))]

    def batches(self, batch_size: int, start_step: int = 0) -> Iterator[Tensor]:
        """Batches of the shuffled stream from step `start_step` on (epochs repeat with new orders)."""
        offset = start_step * batch_size
        epoch, within = divmod(offset, self.n_train)
        # find the buffer holding `within` from the chunk sizes alone, then read only that one
        index, buffers = 0, self._buffer_chunks(epoch)
        sizes = [sum(stop - start for start, stop in map(self._chunk_range, chunks)) for chunks in buffers]
        while within >= sizes[index]:
            within -= sizes[index]
            index += 1
        pending = self._buffer(epoch, index, buffers[index])[within:]
        while True:
            while len(pending) < batch_size:
                index += 1
                if index == len(buffers):
                    epoch, index, buffers = epoch + 1, 0, self._buffer_chunks(epoch + 1)
                pending = torch.cat([pending, self._buffer(epoch, index, buffers[index])])
            yield pending[:batch_size]
            pending = pending[batch_size:]

    def eval_vectors(self, n: int) -> Tensor:
        """The first min(n, holdout) held-out vectors (never trained on)."""
        return self.read_rows(self.n_train, self.n_train + min(n, self.holdout))


def load_ground_truth(path: str | Path, d: int) -> tuple[Tensor, str]:
    """True feature directions [n_true, d] from a .npy or .safetensors file; a [d, n_true] matrix is
    accepted when that reading is the only one that fits d. Returns (matrix, which layout was used)."""
    if not Path(path).is_file():
        raise DataError(f"ground-truth file not found: {path}")
    shard = _ShardFile(find_shards(path)[0])
    matrix = shard.read(0, shard.rows)
    if not torch.isfinite(matrix).all():
        raise DataError(f"{path}: ground truth holds NaN or inf")
    rows, cols = matrix.shape
    if cols == d:
        return matrix, f"[n_true, d] = [{rows}, {cols}] (rows are features)"
    if rows == d:
        return matrix.T.contiguous(), f"[d, n_true] = [{rows}, {cols}], transposed (columns are features)"
    raise DataError(f"{path}: ground truth has shape [{rows}, {cols}], neither dimension matches d={d}")
