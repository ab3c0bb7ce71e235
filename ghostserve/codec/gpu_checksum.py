"""sum64: the chunk checksum of the GPU data path, its numpy reference and its launcher.

The CPU path checksums every (block, chunk, rank) chunk with CRC32C chained over
the chunk's layers. A CRC is sequential (or needs a shift-and-fold per piece); on
a GPU the daemon wants one launch that checksums every chunk a step wrote, each
spread over thousands of threads. sum64 is made for that:

    word i  = bytes [8i, 8i+8) of the chunk (its pieces, in order, as one byte
              string of n bytes), little-endian, zero-padded past n; masked-out
              bytes read as 0
    sum64   = SUM_{i < ceil(n/8)}  mix(word_i XOR ((seed + i) * KEY))   mod 2^64

``mix`` is SplitMix64's finalizer (xor-shifts and odd multiplications: a
bijection of 64-bit words) and ``KEY`` is odd, so ``(seed + i) * KEY`` takes a
different value at every position of a chunk. The kernel is
``cuda/checksum_kernels.cu``; the per-thread code it runs is ``cuda/checksum64.cuh``,
which ``tests/test_gpu_checksum.py`` also builds for the host and compares with
:func:`reference` here.

What it guarantees (by construction, whatever the data):

* Any change confined to one 8-byte word of the chunk (bytes [8i, 8i+8)) changes
  the checksum: that word's term is a bijection of the word and the sum is taken
  in the group Z/2^64, so the sum moves by a non-zero amount. This covers any
  single flipped bit, any corrupted byte, any reordering of bytes within a word,
  and a word overwritten by a copy of a word from elsewhere in the chunk.
* The value is deterministic: an integer sum, so it does not depend on the
  thread count, the launch grid, the order of the reduction (atomics), how the
  chunk is cut into pieces, or the pieces' addresses and alignment.
* Masking: bytes whose slot is ``>= fill`` never affect it (by design: a block
  may keep filling on a survivor after it was encoded); a mask that keeps every
  byte gives exactly the unmasked checksum.

What it does not guarantee:

* A corruption touching two or more words (a 2-byte burst across an 8-byte
  boundary, two flipped bits in different words, two swapped words, a shifted
  range) goes unseen only if the changes of the terms add up to 0 mod 2^64.
  Treating ``mix`` as a random function, that happens with probability 2^-64 per
  corrupted chunk (CRC32C: 2^-32). This is a heuristic, not a proven bound:
  ``mix`` is fixed and public, so error patterns that cancel exist (an adversary
  can forge them: this is not a MAC), and unlike a CRC there is no guaranteed
  detection of bursts longer than a word or of any number of bit errors beyond
  one word. The tests measure it on structured patterns a plain ``w_i * K(i)``
  sum would always miss (the same high bit flipped in two words) and find none.
* It is not CRC32C: the GPU path stores sum64 values, the CPU path CRC32Cs; the two
  cannot check each other's chunks.
* A chunk and the same chunk extended by zero bytes up to the next multiple of 8
  have the same sum (the length is fixed by the layout, ``chunk_bytes x layers``).
  Chunks of equal content at the same offsets have equal sums unless their seeds
  differ: a per-(block, chunk, rank) seed (:func:`seed_of`) also makes a chunk
  that holds another chunk's correct bytes (a misdirected write) look corrupt.

Slot-addressed blocks: with a slot map (one uint16 per byte of a layer of the
chunk, ``period`` bytes: for vLLM's layouts the chunk is the block, so
``period = block_bytes``), byte p counts only if ``slot_map[p % period] < fill``,
as the CPU path's masked CRC. Pass no slot map when the block is full.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ghostserve.codec.cupy_backend import cuda_dir
from ghostserve.errors import BackendUnavailable

# Mirrors of cuda/checksum64.cuh (checked against the host build by the tests).
KEY = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
THREADS = 256                # gs::GS_SUM_THREADS, the kernel's __launch_bounds__
CHUNK_FIELDS = 7             # first piece, pieces, total, slot map, fill, period, seed
PIECE_FIELDS = 2             # address, length
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535
WORDS_PER_THREAD = 16        # grid sizing: aim for at least this many words a thread
KERNEL = "gs_checksum64"
SOURCE = "checksum_kernels.cu"
_M64 = (1 << 64) - 1

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_.\-]+)"[ \t]*$', re.MULTILINE)


# --------------------------------------------------------------------- reference


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def terms(words: np.ndarray, seed: int = 0, start: int = 0) -> np.ndarray:
    """The per-word terms of words ``start, start + 1, ...`` (uint64 arrays)."""
    words = np.asarray(words, dtype=np.uint64)
    index = np.arange(start, start + words.size, dtype=np.uint64) + np.uint64(seed & _M64)
    return mix64(words ^ (index * np.uint64(KEY)))


def _as_bytes(pieces: Any) -> np.ndarray:
    if isinstance(pieces, (bytes, bytearray, memoryview, np.ndarray)):
        pieces = [pieces]
    parts = [np.frombuffer(p, dtype=np.uint8) if not isinstance(p, np.ndarray) else p.reshape(-1).view(np.uint8)
             for p in pieces]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def reference(pieces: Any, *, slot_map: np.ndarray | None = None, fill: int = 0, period: int | None = None,
              seed: int = 0) -> int:
    """sum64 of the chunk made of ``pieces`` (one bytes-like or uint8 array, or a
    sequence of them, in order): the oracle for the kernel. With ``slot_map`` (uint16,
    ``period`` entries, default all of it) only bytes p with ``slot_map[p % period] <
    fill`` count."""
    data = _as_bytes(pieces)
    if slot_map is not None:
        slots = np.asarray(slot_map, dtype=np.uint16).reshape(-1)
        period = slots.size if period is None else int(period)
        if not 0 < period <= slots.size:
            raise ValueError(f"period {period} for a slot map of {slots.size} entries")
        cap = min(int(fill), 1 << 17)  # slots are uint16: any fill above 65535 keeps every byte
        keep = slots[np.arange(data.size, dtype=np.int64) % period].astype(np.int64) < cap
        data = np.where(keep, data, np.uint8(0))
    pad = (-data.size) % 8
    if pad:
        data = np.concatenate([data, np.zeros(pad, np.uint8)])
    words = data.view("<u8")
    return int(terms(words, seed).sum(dtype=np.uint64)) if words.size else 0


def seed_of(block: int, chunk: int, rank: int) -> int:
    """A per-(block, chunk, rank) seed: distinct triples get unrelated position keys,
    so a chunk that holds another chunk's bytes does not match its checksum."""
    z = np.array([(block & 0xFFFFFFFF) << 32 | (chunk & 0xFFFFFFFF), rank & _M64], dtype=np.uint64)
    return int(mix64(mix64(z[:1])[0] ^ z[1:])[0])


# ------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class Chunk:
    """One chunk to checksum on the device.

    ``pieces``: (device address, bytes) in order (one or more per layer);
    ``slot_map``: device address of a uint16 array of ``period`` entries (2-byte
    aligned), or 0 for no mask; ``fill``: slots below it count; ``seed``: see
    :func:`seed_of`; ``total``: if given, the pieces must add up to it (the
    layout's ``chunk_bytes * num_layers``). Addresses are not owned: the memory
    must outlive the launch (``keep`` holds what :meth:`of` was given, for that)."""

    pieces: Sequence[tuple[int, int]]
    slot_map: int = 0
    fill: int = 0
    period: int = 0
    seed: int = 0
    total: int | None = field(default=None)
    keep: tuple = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, pieces: Iterable[Any], *, slot_map: Any = None, fill: int = 0, seed: int = 0,
           total: int | None = None) -> Chunk:
        """From contiguous CuPy arrays (or (address, bytes) pairs) and an optional
        CuPy uint16 slot map (its size is the period)."""
        arrays = tuple(pieces)
        cut = [_piece(p) for p in arrays]
        if slot_map is None:
            return cls(cut, seed=seed, total=total, keep=arrays)
        if getattr(slot_map, "dtype", None) != np.uint16 or not slot_map.flags.c_contiguous:
            raise ValueError("the slot map must be a contiguous uint16 device array")
        return cls(cut, slot_map=int(slot_map.data.ptr), fill=int(fill), period=int(slot_map.size), seed=seed,
                   total=total, keep=(*arrays, slot_map))


def _piece(obj: Any) -> tuple[int, int]:
    if isinstance(obj, tuple):
        addr, length = obj
        return int(addr), int(length)
    if not obj.flags.c_contiguous:
        raise ValueError("a piece must be a contiguous device array (or an (address, bytes) pair)")
    return int(obj.data.ptr), int(obj.nbytes)


def descriptors(chunks: Sequence[Chunk]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk descriptors (n, CHUNK_FIELDS), piece descriptors (pieces, PIECE_FIELDS)),
    uint64, as ``gs_checksum64`` reads them; raises ValueError for a chunk the
    kernel would trap on."""
    desc = np.zeros((len(chunks), CHUNK_FIELDS), dtype=np.uint64)
    flat: list[tuple[int, int]] = []
    for c, ch in enumerate(chunks):
        total = 0
        for addr, length in ch.pieces:
            if not (0 <= addr <= _M64 and 0 <= length <= _M64 and (length == 0 or addr + length - 1 <= _M64)):
                raise ValueError(f"chunk {c}: bad piece ({addr:#x}, {length})")
            total += length
        if ch.total is not None and total != ch.total:
            raise ValueError(f"chunk {c}: pieces hold {total} bytes, the layout says {ch.total}")
        if total > _M64:
            raise ValueError(f"chunk {c}: {total} bytes")
        if ch.slot_map:
            if ch.slot_map % 2 or not 0 < ch.period < 1 << 60 or not 0 <= ch.fill <= _M64:
                raise ValueError(f"chunk {c}: slot map {ch.slot_map:#x} (period {ch.period}, fill {ch.fill})")
        desc[c] = (len(flat), len(ch.pieces), total, ch.slot_map, ch.fill if ch.slot_map else 0,
                   ch.period if ch.slot_map else 0, ch.seed & _M64)
        flat.extend(ch.pieces)
    pieces = np.array(flat, dtype=np.uint64).reshape(-1, PIECE_FIELDS)
    return desc, pieces


def grid(nchunks: int, max_words: int, resident: int) -> tuple[int, int]:
    """(gx, gy) for a launch: gy chunks at a time (each block row takes every gy-th
    chunk), gx blocks per chunk, enough for WORDS_PER_THREAD words a thread on the
    largest chunk but no more than about two waves of ``resident`` blocks in all."""
    gy = max(1, min(nchunks, MAX_GRID_Y))
    want = -(-max_words // (THREADS * WORDS_PER_THREAD))
    cap = -(-2 * max(1, resident) // gy)
    return max(1, min(want, cap, MAX_GRID_X)), gy


# ------------------------------------------------------------------- the launcher


def kernel_source(directory: Path | None = None) -> str:
    """``checksum_kernels.cu`` with its local includes pasted in (CuPy's compile cache
    is keyed by the source text, so an edited header is never served stale)."""
    directory = cuda_dir() if directory is None else directory
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(lambda m: expand(m.group(1)), (directory / name).read_text())

    return expand(SOURCE)


class GpuChecksum:
    """sum64 of many chunks in one ``gs_checksum64`` launch, through CuPy.

    :meth:`checksums` queues the launch on the current CuPy stream and returns a
    device uint64 array (the caller orders it after the writes to the chunks, for
    example by calling it on the stream that wrote them, and synchronises before
    reading the result; :meth:`checksums_host` does that for it)."""

    def __init__(self, device: int | None = None):
        try:
            import cupy  # noqa: PLC0415
        except ImportError as exc:
            raise BackendUnavailable("cupy", f"CuPy is not installed ({exc})") from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver, ...
            raise BackendUnavailable("cupy", f"no usable CUDA driver ({exc})") from exc
        if count < 1:
            raise BackendUnavailable("cupy", "no CUDA device")
        self._cp = cupy
        self.device = cupy.cuda.Device().id if device is None else int(device)
        directory = cuda_dir()
        rt = cupy.cuda.runtime
        with cupy.cuda.Device(self.device):
            module = cupy.RawModule(code=kernel_source(directory), options=("-I" + str(directory),))
            self._kernel = module.get_function(KERNEL)
            sms = rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, self.device)
            per_sm = rt.deviceGetAttribute(rt.cudaDevAttrMaxThreadsPerMultiProcessor, self.device) // THREADS
        self.resident = max(1, sms * max(1, per_sm))

    def checksums(self, chunks: Sequence[Chunk], out: Any = None) -> Any:
        """sum64 of every chunk into a device uint64 array (``out`` if given: zeroed first)."""
        cp = self._cp
        desc, pieces = descriptors(chunks)
        n = len(chunks)
        with cp.cuda.Device(self.device):
            if out is None:
                out = cp.zeros(n, dtype=cp.uint64)
            else:
                if out.dtype != np.uint64 or out.shape != (n,) or not out.flags.c_contiguous:
                    raise ValueError(f"out must be a contiguous uint64 device array of {n}")
                out.fill(0)
            max_words = (int(desc[:, 2].max()) + 7) // 8 if n else 0
            if max_words == 0:
                return out
            gx, gy = grid(n, max_words, self.resident)
            self._kernel((gx, gy), (THREADS,),
                         (cp.asarray(desc.reshape(-1)), cp.asarray(pieces.reshape(-1)), np.uint64(n), out))
        return out

    def checksums_host(self, chunks: Sequence[Chunk]) -> list[int]:
        """:meth:`checksums`, waited for, as Python ints."""
        out = self.checksums(chunks)
        return [int(x) for x in self._cp.asnumpy(out)]
