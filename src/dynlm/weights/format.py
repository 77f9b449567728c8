"""The weights-as-code format: cells, payloads, codecs and the writer. NumPy only (no torch), so
that the NumPy runtime can read a code checkpoint without importing torch.

A code checkpoint is a folder of Python files that are never executed (see `safe_loader.py`):

    config.py          CONFIG = {...}            config.json as a literal (+ generation config)
    vocab.py           TOKENIZER = {...}         tokenizer.json as a literal (+ tokenizer_config.json)
    weights.py         MODEL = {...}, CELLS = [Cell(...), ...]
    loader.py          a stub that calls dynlm's safe loader
    blobs.safetensors  "hybrid" mode only: the large payloads as raw tensors

A `Cell` is one tensor: name, shape, dtype, sha256 (of the dtype and shape as text, then the
raw little-endian bytes; see `cell_sha256`), summary statistics, a free-text note, a history of
events, and a payload:

    Literal([...])                   the values as decimal literals (small tensors: norms, biases)
    Inline(planes=..., b85="...")    byte planes, each raw or deflated, then base85 (RFC 1924)
    Ref("blobs.safetensors", key)    a tensor of a safetensors file in the same folder
    Shared("../shared/x.py", name)   a cell of another code file, verified by this cell's sha256

Inline payloads in detail: the tensor's little-endian bytes are split into byte planes (plane i
holds byte i of every element; a float32 tensor has 4 planes), each plane is stored raw or
compressed with zlib (whichever is smaller), the stored planes are concatenated and encoded with
base85 (`base64.b85encode`). `planes=(("raw", n0), ("zlib", n1), ...)` gives each plane's method
and stored length, so a person can decode a cell with the standard library alone. Byte planes
are what makes deflate win on floats: the sign/exponent plane of trained weights has ~3 bits of
entropy per byte while the low mantissa planes are noise that no lossless coder shrinks.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_NAME = "dynlm-weights-as-code"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.py"
CONFIG_FILE = "config.py"
VOCAB_FILE = "vocab.py"
LOADER_FILE = "loader.py"
DELTA_FILE = "delta.py"
BLOBS_FILE = "blobs.safetensors"

# Tensors up to this many elements (and at most 1-D) are written as decimal literals by default.
DEFAULT_LITERAL_MAX = 4096
# Limits the loader enforces on any file (a hostile file cannot make us allocate without bound).
MAX_LITERAL_VALUES = 1 << 20
MAX_NUMEL = 1 << 40
MAX_NDIM = 8


class PayloadError(ValueError):
    """A payload that cannot be decoded; the caller adds the file and line."""


# ---------------------------------------------------------------------------------------------
# Dtypes


@dataclass(frozen=True)
class DType:
    name: str  # the name written in files, as torch spells it: "float32", "bfloat16", ...
    storage: str  # little-endian numpy dtype holding the raw bits (bfloat16: "<u2")
    kind: str  # "float" | "int" | "bool"
    safetensors: str  # the safetensors dtype code


DTYPES: dict[str, DType] = {d.name: d for d in [
    DType("float64", "<f8", "float", "F64"),
    DType("float32", "<f4", "float", "F32"),
    DType("float16", "<f2", "float", "F16"),
    DType("bfloat16", "<u2", "float", "BF16"),
    DType("int64", "<i8", "int", "I64"),
    DType("int32", "<i4", "int", "I32"),
    DType("int16", "<i2", "int", "I16"),
    DType("int8", "i1", "int", "I8"),
    DType("uint8", "u1", "int", "U8"),
    DType("bool", "?", "bool", "BOOL"),
]}
SAFETENSORS_DTYPES = {d.safetensors: d for d in DTYPES.values()}


def dtype_info(name: str) -> DType:
    if name not in DTYPES:
        raise PayloadError(f"unknown dtype '{name}' (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even as torch does (NaN stays NaN)."""
    bits = contiguous(np.asarray(values, dtype=np.float32)).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)  # quiet NaN, sign kept
    return rounded


def as_float(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float values (float32 for 16/32-bit floats, float64 for float64)."""
    if dtype == "bfloat16":
        return bf16_to_float32(arr)
    if dtype == "float64":
        return arr
    return arr.astype(np.float32, copy=False)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float values -> storage array of `dtype` (round to nearest; bfloat16 as bits)."""
    if dtype == "bfloat16":
        return float32_to_bf16(np.asarray(values, dtype=np.float32))
    return np.asarray(values).astype(DTYPES[dtype].storage)


def contiguous(arr: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray turns them into shape (1,))."""
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


# ---------------------------------------------------------------------------------------------
# Cells and payloads. The classes double as the names a trusted `import weights` would call.


@dataclass
class Literal:
    """The values, flattened in C order, as Python literals."""

    values: list
    lineno: int = field(default=0, compare=False, repr=False)


@dataclass
class Inline:
    """Byte planes (method, stored length) and their concatenation in base85."""

    planes: tuple
    b85: Any  # str in a file; the loader keeps a zero-copy view of the file's bytes
    lineno: int = field(default=0, compare=False, repr=False)


@dataclass
class Ref:
    """A tensor stored in a safetensors file of the same folder."""

    file: str
    key: str
    lineno: int = field(default=0, compare=False, repr=False)


@dataclass
class Shared:
    """A cell of another code file (path relative to this folder); verified by the cell's sha256."""

    path: str
    name: str
    lineno: int = field(default=0, compare=False, repr=False)


Payload = Literal | Inline | Ref | Shared


@dataclass
class Cell:
    name: str
    shape: tuple
    dtype: str
    sha256: str | None
    data: Payload
    stats: dict = field(default_factory=dict)
    note: str = ""
    history: list = field(default_factory=list)
    lineno: int = field(default=0, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(DTYPES[self.dtype].storage).itemsize


@dataclass
class DeltaCell:
    """How one tensor changed: `kind` is "dense" (arithmetic difference + exact fix-ups),
    "sparse" (positions and new values) or "lowrank" (u @ v approximates the difference).
    `parts` are the tensors that describe it, each a `Cell`."""

    name: str
    kind: str
    shape: tuple
    dtype: str
    base_sha256: str
    result_sha256: str
    parts: list
    rel_error: float = 0.0
    stats: dict = field(default_factory=dict)
    lineno: int = field(default=0, compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Hashes and statistics


def cell_sha256(arr: np.ndarray, dtype: str, shape: tuple[int, ...] | None = None) -> str:
    """A cell's sha256: of its dtype and shape written as text, e.g. b"float32[64, 32]", followed
    by its raw little-endian bytes in C order. Binding dtype and shape means a cell whose bytes
    are reinterpreted (float32 read as int32, (64, 32) read as (32, 64)) fails its hash too."""
    arr = contiguous(arr)
    shape = tuple(arr.shape) if shape is None else tuple(shape)
    h = hashlib.sha256(f"{dtype}{list(shape)}".encode())
    h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def _round(value: float, digits: int = 4) -> float | str:
    if not math.isfinite(value):
        return str(value)
    return float(f"{value:.{digits}g}")


def tensor_stats(arr: np.ndarray, dtype: str) -> dict[str, Any]:
    """Summary statistics shown in the file (4 significant digits), computed in float64 over
    chunks so that memory stays small."""
    if arr.size == 0:
        return {}
    info = DTYPES[dtype]
    flat = arr.reshape(-1)
    if info.kind == "bool":
        return {"true": _round(float(np.count_nonzero(flat)) / flat.size)}
    total = squares = 0.0
    count = nonzero = 0
    low, high = math.inf, -math.inf
    for start in range(0, flat.size, 1 << 20):
        values = flat[start: start + (1 << 20)]
        # floats of 32 bits or less: float32 with numpy's pairwise sums (accurate far beyond the
        # 4 digits shown); integers and float64 in float64
        values = as_float(values, dtype) if info.kind == "float" else values.astype(np.float64)
        chunk_sum = float(values.sum())
        if not math.isfinite(chunk_sum):  # only then pay for masking out inf / nan
            values = values[np.isfinite(values)]
            chunk_sum = float(values.sum(dtype=np.float64))
        if values.size == 0:
            continue
        count += values.size
        total += chunk_sum
        squares += float(np.square(values).sum())
        nonzero += int(np.count_nonzero(values))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    nonfinite = flat.size - count
    if count == 0:
        return {"nonfinite": nonfinite}
    mean, mean_sq = total / count, squares / count
    out: dict[str, Any] = {
        "mean": _round(mean),
        "std": _round(math.sqrt(max(mean_sq - mean * mean, 0.0))),
        "min": _round(low),
        "max": _round(high),
        "rms": _round(math.sqrt(mean_sq)),
        "zeros": _round(1.0 - nonzero / count),
    }
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


# ---------------------------------------------------------------------------------------------
# Base85 (RFC 1924 alphabet, byte-compatible with `base64.b85encode` / `b85decode`), vectorised

B85_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
_B85_TABLE = np.frombuffer(B85_ALPHABET, np.uint8)
# Two characters at once: digit pair d1 * 85 + d2 <-> the pair's two bytes read as a little-endian uint16.
_B85_PAIRS = np.frombuffer(bytes(c for i in B85_ALPHABET for j in B85_ALPHABET for c in (i, j)), "<u2")
_B85_DECODE = np.full(256, 255, np.uint8)
_B85_DECODE[_B85_TABLE] = np.arange(85, dtype=np.uint8)
_B85_PAIR_DECODE = np.full(1 << 16, 0xFFFF, np.uint16)
_B85_PAIR_DECODE[_B85_PAIRS] = np.arange(85 * 85, dtype=np.uint16)
_CHUNK = 1 << 15  # 4-byte groups per step: temporaries stay in cache, threads interleave


def b85encode(data: bytes | memoryview | np.ndarray) -> np.ndarray:
    """`base64.b85encode(data)` as a uint8 array (write it with `.tobytes()` or as a buffer),
    ~50x faster than the standard library."""
    raw = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    pad = (-raw.size) % 4
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    words = raw.view(">u4")
    out = np.empty(words.size * 5, np.uint8)
    for start in range(0, words.size, _CHUNK):
        m = min(_CHUNK, words.size - start)
        w = words[start:start + m].astype(np.uint32)
        high = w // np.uint32(7225)  # w = high * 7225 + low; high < 85^3
        low = w - high * np.uint32(7225)  # digits 3, 4
        top = high // np.uint32(7225)  # digit 0
        mid = high - top * np.uint32(7225)  # digits 1, 2
        base = start * 5
        out[base: base + 5 * m: 5] = _B85_TABLE[top]
        np.ndarray((m,), "<u2", out, base + 1, (5,))[:] = _B85_PAIRS[mid]  # two characters per store
        np.ndarray((m,), "<u2", out, base + 3, (5,))[:] = _B85_PAIRS[low]
    return out[: out.size - pad] if pad else out


def _b85_text(text: str | bytes | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise PayloadError("base85 payload holds non-ASCII characters") from None
    return text.reshape(-1).view(np.uint8) if isinstance(text, np.ndarray) else np.frombuffer(text, np.uint8)


def b85_decoded_size(chars: int) -> int:
    if chars % 5 == 1:
        raise PayloadError(f"a base85 text of {chars} characters is truncated (length 1 mod 5)")
    return chars // 5 * 4 + max(chars % 5 - 1, 0)


def _b85_chunks(chars: np.ndarray):
    """Decoded bytes of a base85 text, chunk by chunk (uint8 arrays; the last one trimmed)."""
    b85_decoded_size(chars.size)  # refuses a truncated text
    full = chars.size // 5
    out = np.empty(min(full, _CHUNK), ">u4")
    for start in range(0, full, _CHUNK):
        m = min(_CHUNK, full - start)
        base = start * 5
        d0 = _B85_DECODE[chars[base: base + 5 * m: 5]]
        p12 = _B85_PAIR_DECODE[np.ndarray((m,), "<u2", chars, base + 1, (5,))]
        p34 = _B85_PAIR_DECODE[np.ndarray((m,), "<u2", chars, base + 3, (5,))]
        if d0.max() > 82 or p12.max() > 7224 or p34.max() > 7224:
            _b85_error(chars[base: base + 5 * m], base)
        value = d0.astype(np.uint32) * np.uint32(85**4) + p12.astype(np.uint32) * np.uint32(7225) + p34
        top = np.flatnonzero(d0 == 82)  # only groups starting with digit 82 can pass 2^32 - 1
        if top.size and (82 * 85**4 + p12[top].astype(np.uint64) * 7225 + p34[top] > 0xFFFFFFFF).any():
            raise PayloadError("bad base85 payload (a 5-character group overflows 32 bits)")
        out[:m] = value
        yield out[:m].view(np.uint8)  # reused by the next step: consume before asking for more
    tail = chars.size - full * 5
    if tail:  # pad the last group with "~" (84), keep tail - 1 bytes, as base64.b85decode does
        group = np.concatenate([chars[full * 5:], np.full(5 - tail, ord("~"), np.uint8)])
        digits = _B85_DECODE[group].astype(np.uint64)
        if digits.max() == 255:
            _b85_error(group, full * 5)
        value = int((((digits[0] * 85 + digits[1]) * 85 + digits[2]) * 85 + digits[3]) * 85 + digits[4])
        if value > 0xFFFFFFFF:
            raise PayloadError("bad base85 payload (a 5-character group overflows 32 bits)")
        yield np.frombuffer(value.to_bytes(4, "big")[: tail - 1], np.uint8)


def _b85_error(chars: np.ndarray, offset: int):
    digits = _B85_DECODE[chars]
    bad = np.flatnonzero(digits == 255)
    if bad.size:
        raise PayloadError(f"bad base85 character {chr(chars[bad[0]])!r} at offset {offset + int(bad[0])}")
    raise PayloadError("bad base85 payload (a 5-character group overflows 32 bits)")


def b85decode(text: str | bytes | memoryview | np.ndarray) -> bytes:
    """`base64.b85decode(text)` (refusing the same things: bad characters, overflowing groups)."""
    return b"".join(chunk.tobytes() for chunk in _b85_chunks(_b85_text(text)))


# ---------------------------------------------------------------------------------------------
# Inline payloads: byte planes + zlib + base85

_SAMPLE = 1 << 14


def _deflate(plane: bytes | memoryview, huffman_only: bool, level: int = 6) -> bytes:
    # Huffman-only coding is 3-20x faster than LZ77 matching and as good on exponent planes
    # (i.i.d.-looking bytes); LZ77 wins on runs (zeros, repeated rows).
    strategy = zlib.Z_HUFFMAN_ONLY if huffman_only else zlib.Z_DEFAULT_STRATEGY
    c = zlib.compressobj(level, zlib.DEFLATED, 15, 9, strategy)
    return c.compress(plane) + c.flush()


def _plane_method(plane: np.ndarray) -> str:
    """"raw", "huffman" or "lz77" for a (possibly strided) byte plane, judged on a 16 KB sample
    (LZ77 tried at its fastest level): noise planes, the low mantissa bytes, cost little."""
    sample = memoryview(np.ascontiguousarray(plane[:_SAMPLE]))
    huffman, lz77 = len(_deflate(sample, True)), len(_deflate(sample, False, level=1))
    if min(huffman, lz77) > 0.98 * len(sample):
        return "raw"
    return "huffman" if huffman <= lz77 else "lz77"


def encode_inline(arr: np.ndarray) -> Inline:
    """A storage array -> Inline payload (its `b85` a uint8 array of base85 characters). Each
    byte plane is written straight into one buffer: raw, or deflated block by block."""
    arr = contiguous(arr)
    itemsize = arr.dtype.itemsize
    raw = arr.reshape(-1).view(np.uint8).reshape(-1, itemsize)
    n = raw.shape[0]
    stored = np.empty(n * itemsize, np.uint8)
    offset, planes = 0, []
    for i in range(itemsize):
        plane = raw[:, i]  # strided view: byte i of every element
        method = _plane_method(plane) if n else "raw"
        size = _deflate_into(plane, stored, offset, method == "huffman") if method != "raw" else None
        if size is None or size >= n:  # incompressible after all: store it raw
            stored[offset: offset + n] = plane
            planes.append(("raw", n))
            offset += n
        else:
            planes.append(("zlib", size))
            offset += size
    return Inline(planes=tuple(planes), b85=b85encode(stored[:offset]))


def _deflate_into(plane: np.ndarray, out: np.ndarray, offset: int, huffman_only: bool) -> int | None:
    """Deflate a byte plane into out[offset:]; None when it does not fit in the plane's own size."""
    strategy = zlib.Z_HUFFMAN_ONLY if huffman_only else zlib.Z_DEFAULT_STRATEGY
    compressor = zlib.compressobj(6, zlib.DEFLATED, 15, 9, strategy)
    limit, written = plane.shape[0], 0
    for start in range(0, plane.shape[0] + 1, 1 << 18):
        block = np.ascontiguousarray(plane[start: start + (1 << 18)])
        data = compressor.compress(memoryview(block)) if block.size else b""
        if start + (1 << 18) > plane.shape[0]:
            data += compressor.flush()
        if written + len(data) >= limit:
            return None
        out[offset + written: offset + written + len(data)] = np.frombuffer(data, np.uint8)
        written += len(data)
    return written


# deflate cannot expand data more than ~1032 times (a 258-byte match per 2 bits at best)
DEFLATE_MAX_RATIO = 1032


def check_payload_size(payload: Payload, numel: int, dtype: str) -> None:
    """Refuse a Literal or Inline payload that cannot hold `numel` elements of `dtype`, from the
    sizes it declares alone (nothing decoded, nothing allocated): a raw byte plane must hold one
    byte per element, a deflated one at most `DEFLATE_MAX_RATIO` times its length, and the
    base85 text exactly the planes' bytes. Ref and Shared payloads are checked against their
    source when read."""
    if isinstance(payload, Literal):
        if len(payload.values) != numel:
            raise PayloadError(f"Literal holds {len(payload.values)} values, the shape needs {numel}")
        return
    if not isinstance(payload, Inline):
        return
    itemsize = np.dtype(dtype_info(dtype).storage).itemsize
    if len(payload.planes) != itemsize:
        raise PayloadError(f"{len(payload.planes)} byte planes for dtype {dtype} (expects {itemsize})")
    for i, (method, length) in enumerate(payload.planes):
        if method == "raw" and length != numel:
            raise PayloadError(f"raw byte plane {i} holds {length} bytes, the shape needs {numel}")
        if method == "zlib" and numel > DEFLATE_MAX_RATIO * length + 1024:
            raise PayloadError(f"deflated byte plane {i} of {length} bytes cannot hold the {numel:,} bytes the "
                               "shape declares")
    chars = len(payload.b85)
    stored = sum(n for _, n in payload.planes)
    if stored != b85_decoded_size(chars):
        raise PayloadError(f"planes declare {stored} bytes but the base85 text holds {b85_decoded_size(chars)}")


def decode_inline(payload: Inline, numel: int, dtype: str) -> np.ndarray:
    """Inline payload -> flat storage array. Streams: base85 is decoded chunk by chunk straight
    into the output's byte planes, so memory stays at the tensor's size. Every length is
    checked, and inflating stops at the tensor's size (a deflate bomb cannot grow)."""
    storage = np.dtype(DTYPES[dtype].storage)
    planes = payload.planes
    check_payload_size(payload, numel, dtype)  # before allocating from the declared shape
    chars = _b85_text(payload.b85)
    out = np.empty((numel, storage.itemsize), np.uint8)
    state = _PlaneWriter(out, planes)
    for chunk in _b85_chunks(chars):
        state.feed(chunk)
    state.finish()
    return out.reshape(-1).view(storage)


class _PlaneWriter:
    """Routes the decoded stream into byte planes (raw copy or inflate)."""

    def __init__(self, out: np.ndarray, planes: tuple):
        self.out, self.planes = out, planes
        self.numel = out.shape[0]
        self.plane = -1
        self._next_plane()

    def _next_plane(self) -> None:
        self.plane += 1
        self.left = self.planes[self.plane][1] if self.plane < len(self.planes) else 0
        self.col = 0
        self.inflater = zlib.decompressobj() if self.plane < len(self.planes) and \
            self.planes[self.plane][0] == "zlib" else None

    def _close_plane(self) -> None:
        if self.inflater is not None:
            try:
                self._write(self.inflater.flush())
            except zlib.error as e:
                raise PayloadError(f"byte plane {self.plane} is not valid zlib data ({e})") from None
            if not self.inflater.eof or self.inflater.unused_data:
                raise PayloadError(f"byte plane {self.plane} is not one complete zlib stream")
        if self.col != self.numel:
            raise PayloadError(f"byte plane {self.plane} holds {self.col} bytes, the shape needs {self.numel}")
        self._next_plane()

    def _write(self, data: bytes | np.ndarray) -> None:
        n = len(data)
        if self.col + n > self.numel:
            raise PayloadError(f"byte plane {self.plane} holds more than the {self.numel} bytes the shape needs")
        self.out[self.col: self.col + n, self.plane] = np.frombuffer(data, np.uint8) if isinstance(data, bytes) \
            else data
        self.col += n

    def feed(self, chunk: np.ndarray) -> None:
        pos = 0
        while pos < chunk.size:
            while self.left == 0 and self.plane < len(self.planes):
                self._close_plane()
            if self.plane >= len(self.planes):
                raise PayloadError("the base85 text holds more bytes than its planes declare")
            take = min(chunk.size - pos, self.left)
            piece = chunk[pos: pos + take]
            if self.inflater is None:
                self._write(piece)
            else:
                try:  # at most one byte more than fits: enough to notice an oversized plane
                    data = self.inflater.decompress(memoryview(piece), self.numel - self.col + 1)
                except zlib.error as e:
                    raise PayloadError(f"byte plane {self.plane} is not valid zlib data ({e})") from None
                self._write(data)
                if self.inflater.unconsumed_tail:
                    raise PayloadError(f"byte plane {self.plane} inflates past the {self.numel} bytes the shape needs")
            self.left -= take
            pos += take

    def finish(self) -> None:
        while self.plane < len(self.planes):
            if self.left:
                raise PayloadError(f"byte plane {self.plane} is truncated")
            self._close_plane()


# ---------------------------------------------------------------------------------------------
# Literal payloads: decimal values a person can read and edit


def float_text(value: float, dtype: str) -> str:
    """Shortest decimal that reads back to the same value through `decode_literal`."""
    if dtype == "float64":
        return repr(float(value))
    if dtype == "float32":
        return str(np.float32(value))
    if dtype == "float16":
        return str(np.float16(value))
    # bfloat16: shortest of 1..9 significant digits that rounds back to the same bits
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if float32_to_bf16(np.array([float(text)], np.float32))[0] == float32_to_bf16(np.array([value]))[0]:
            return text
    return repr(float(value))


def encode_literal(arr: np.ndarray, dtype: str) -> Literal | None:
    """Literal payload, or None when the tensor holds non-finite values (written Inline)."""
    info = DTYPES[dtype]
    flat = arr.reshape(-1)
    if info.kind == "bool":
        return Literal([bool(v) for v in flat])
    if info.kind == "int":
        return Literal([int(v) for v in flat])
    values = as_float(flat, dtype)
    if not np.isfinite(values).all():
        return None
    texts = [float_text(float(v), dtype) for v in values]
    numbers = [float(t) for t in texts]
    back = _literal_floats(numbers, dtype)
    bits = f"u{back.dtype.itemsize}"
    mismatch = np.flatnonzero(back.view(bits) != flat.view(bits))
    for i in mismatch:  # double rounding decimal -> float64 -> narrow type missed: exact float64 text
        numbers[i] = float(values[i])
    return Literal(numbers)


def _literal_floats(numbers: list, dtype: str) -> np.ndarray:
    """Python numbers -> storage array, rounding each float64 to the dtype (as a person expects
    an edited `0.3` to become the nearest bfloat16)."""
    values = np.array(numbers, dtype=np.float64)
    if dtype == "float64":
        return values
    if dtype == "bfloat16":
        return float32_to_bf16(values.astype(np.float32))
    return values.astype(DTYPES[dtype].storage)


def decode_literal(payload: Literal, numel: int, dtype: str) -> np.ndarray:
    values = payload.values
    if len(values) != numel:
        raise PayloadError(f"Literal holds {len(values)} values, the shape needs {numel}")
    info = DTYPES[dtype]
    if info.kind == "bool":
        if not all(isinstance(v, bool) for v in values):
            raise PayloadError("a bool Literal must hold only True/False")
        return np.array(values, dtype=np.bool_)
    if info.kind == "int":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise PayloadError(f"an {dtype} Literal must hold only integers")
        limits = np.iinfo(np.dtype(info.storage))
        if values and (min(values) < limits.min or max(values) > limits.max):
            raise PayloadError(f"a value does not fit in {dtype} [{limits.min}, {limits.max}]")
        return np.array(values, dtype=info.storage)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise PayloadError(f"a {dtype} Literal must hold only numbers")
    with np.errstate(over="ignore"):
        return _literal_floats(values, dtype)


# ---------------------------------------------------------------------------------------------
# Writing: a small pretty-printer for Python literals, and the cell layout

INDENT = "    "
WIDTH = 120


def _string(text: str) -> str:
    """A string literal, double-quoted when possible (repr escapes anything unprintable)."""
    literal = repr(text)
    if literal.startswith("'") and '"' not in text:
        literal = '"' + literal[1:-1] + '"'
    return literal


def _scalar(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite float {value} as a literal")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    raise TypeError(f"cannot write {type(value).__name__} as a literal")


def render(value: Any, indent: int = 0, width: int = WIDTH) -> str:
    """Python literal text for dict/list/tuple/str/int/float/bool/None; short containers stay on
    one line, long ones put one item per line (lists of scalars are packed to the width)."""
    pad = INDENT * indent
    if isinstance(value, (dict, list, tuple)):
        flat = _flat(value)
        if flat is not None and len(pad) + len(flat) <= width:
            return flat
        inner = INDENT * (indent + 1)
        if isinstance(value, dict):
            items = [f"{inner}{_string(k)}: {render(v, indent + 1, width).lstrip()}," for k, v in value.items()]
            return "{\n" + "\n".join(items) + f"\n{pad}}}"
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        if all(not isinstance(v, (dict, list, tuple)) for v in value):  # pack scalars
            lines, line = [], inner
            for v in value:
                piece = _scalar(v) + ","
                if len(line) + len(piece) + 1 > width and line.strip():
                    lines.append(line.rstrip())
                    line = inner
                line += piece + " "
            lines.append(line.rstrip())
            return open_ + "\n" + "\n".join(lines) + f"\n{pad}{close}"
        items = [f"{inner}{render(v, indent + 1, width).lstrip()}," for v in value]
        return open_ + "\n" + "\n".join(items) + f"\n{pad}{close}"
    return _scalar(value)


def _flat(value: Any) -> str | None:
    """One-line form, or None when it would be long anyway."""
    if isinstance(value, dict):
        parts = []
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"dict keys must be strings, got {k!r}")
            text = _flat(v)
            if text is None:
                return None
            parts.append(f"{_string(k)}: {text}")
        text = "{" + ", ".join(parts) + "}"
    elif isinstance(value, (list, tuple)):
        parts = []
        for v in value:
            text = _flat(v)
            if text is None:
                return None
            parts.append(text)
        if isinstance(value, list):
            text = "[" + ", ".join(parts) + "]"
        else:
            text = "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
    else:
        return _scalar(value)
    return text if len(text) <= 4 * WIDTH else None


Piece = str | bytes | memoryview | np.ndarray  # text, or base85 characters written as they are


LITERAL_PER_LINE = 8


def render_values(values: list, indent: int) -> str:
    """A Literal's values, a fixed number per line: editing one value changes one line, so the
    diff of a hand edit stays one line long."""
    if len(values) <= LITERAL_PER_LINE:
        return "[" + ", ".join(_scalar(v) for v in values) + "]"
    pad = INDENT * (indent + 1)
    lines = [pad + ", ".join(_scalar(v) for v in values[i: i + LITERAL_PER_LINE]) + ","
             for i in range(0, len(values), LITERAL_PER_LINE)]
    return "[\n" + "\n".join(lines) + f"\n{INDENT * indent}]"


def render_payload(payload: Payload, indent: int) -> list[Piece]:
    pad = INDENT * (indent + 1)
    if isinstance(payload, Literal):
        return [f"Literal({render_values(payload.values, indent)})"]
    if isinstance(payload, Inline):
        planes = render(tuple(tuple(p) for p in payload.planes))
        b85 = payload.b85
        return [f'Inline(\n{pad}planes={planes},\n{pad}b85="', b85, f'",\n{INDENT * indent})']
    if isinstance(payload, Ref):
        return [f"Ref({_string(payload.file)}, {_string(payload.key)})"]
    if isinstance(payload, Shared):
        return [f"Shared({_string(payload.path)}, {_string(payload.name)})"]
    raise TypeError(f"not a payload: {payload!r}")


def render_cell(cell: Cell, indent: int = 1, compact: bool = False) -> list[Piece]:
    """A Cell call, metadata first and the payload last, so that `git diff` shows the changed
    statistics and history above the (long) payload line. `compact` leaves out an empty note,
    statistics and history (the parts of a delta)."""
    pad = INDENT * (indent + 1)
    lines = [
        "Cell(",
        f"{pad}name={_string(cell.name)},",
        f"{pad}shape={render(tuple(cell.shape))},",
        f"{pad}dtype={_string(cell.dtype)},",
        f"{pad}sha256={_scalar(cell.sha256)},",
    ]
    if cell.stats or not compact:
        lines.append(f"{pad}stats={render(cell.stats, indent + 1)},")
    if cell.note or not compact:
        lines.append(f"{pad}note={_string(cell.note)},")
    if cell.history or not compact:
        lines.append(f"{pad}history={render(cell.history, indent + 1)},")
    lines.append(f"{pad}data=")
    return ["\n".join(lines), *render_payload(cell.data, indent + 1), f",\n{INDENT * indent})"]


def render_delta_cell(cell: DeltaCell, indent: int = 1) -> list[Piece]:
    pad = INDENT * (indent + 1)
    head = "\n".join([
        "DeltaCell(",
        f"{pad}name={_string(cell.name)},",
        f"{pad}kind={_string(cell.kind)},",
        f"{pad}shape={render(tuple(cell.shape))},",
        f"{pad}dtype={_string(cell.dtype)},",
        f"{pad}base_sha256={_string(cell.base_sha256)},",
        f"{pad}result_sha256={_string(cell.result_sha256)},",
        f"{pad}rel_error={_scalar(float(cell.rel_error))},",
        f"{pad}stats={render(cell.stats, indent + 1)},",
        f"{pad}parts=[\n",
    ])
    pieces: list[Piece] = [head]
    for part in cell.parts:
        pieces += [INDENT * (indent + 2), *render_cell(part, indent + 2, compact=True), ",\n"]
    pieces.append(f"{pad}],\n{INDENT * indent})")
    return pieces


IMPORT_LINE = "from dynlm.weights.format import Cell, DeltaCell, Inline, Literal, Ref, Shared  # noqa: F401"


def render_module(docstring: str, assignments: list[tuple[str, Any]], with_import: bool = False) -> list[Piece]:
    """A whole file as pieces: docstring, optional import of the constructors (so that a person
    who trusts the file can also import it), then `NAME = value` lines. A value may be a list of
    Cells / DeltaCells."""
    text = docstring.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    pieces: list[Piece] = ['"""' + text + ('\n"""' if "\n" in text else '"""') + "\n\n"]
    if with_import:
        pieces.append(IMPORT_LINE + "\n\n")
    for name, value in assignments:
        if isinstance(value, list) and value and isinstance(value[0], (Cell, DeltaCell)):
            pieces.append(f"{name} = [\n")
            for cell in value:
                pieces.append(INDENT)
                pieces += render_cell(cell) if isinstance(cell, Cell) else render_delta_cell(cell)
                pieces.append(",\n")
            pieces.append("]\n")
        else:
            pieces.append(f"{name} = {render(value)}\n")
        if "\n" in pieces[-1].rstrip("\n"):
            pieces.append("\n")
    return pieces


def write_pieces(f: Any, pieces: list[Piece]) -> None:
    """Write pieces to a binary file: text as UTF-8, base85 buffers as they are (no copies)."""
    for piece in pieces:
        f.write(piece.encode("utf-8") if isinstance(piece, str) else memoryview(piece))


def pieces_text(pieces: list[Piece]) -> str:
    return "".join(p if isinstance(p, str) else bytes(memoryview(p)).decode("ascii") for p in pieces)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_variable_name(name: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"not a variable name: {name!r}")
    return name
