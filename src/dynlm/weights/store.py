"""Reading and writing code checkpoint folders with NumPy only (no torch import here: the NumPy
runtime reads checkpoints through this module).

    ckpt = CodeCheckpoint("code/")
    ckpt.config                       # config.json as a dict
    ckpt.cells["model.norm.weight"]   # the Cell: shape, dtype, sha256, stats, note, history
    arr = ckpt.array("model.norm.weight")   # decoded and verified against its sha256
    ckpt.decode_count                 # payloads decoded so far (partial loading decodes fewer)
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError, did_you_mean
from dynlm.fileio import atomic_directory, atomic_open
from dynlm.weights.format import (
    BLOBS_FILE,
    CONFIG_FILE,
    DEFAULT_LITERAL_MAX,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOADER_FILE,
    SAFETENSORS_DTYPES,
    VOCAB_FILE,
    WEIGHTS_FILE,
    Cell,
    Inline,
    Literal,
    PayloadError,
    Ref,
    Shared,
    as_float,
    cell_sha256,
    check_payload_size,
    contiguous,
    decode_inline,
    decode_literal,
    encode_inline,
    encode_literal,
    from_float,
    pieces_text,
    render_module,
    tensor_stats,
    write_pieces,
)
from dynlm.weights.safe_loader import LoadLimits, ParsedFile, default_limits, over_budget, parse_file

Tensor = tuple[np.ndarray, str]  # (storage array shaped like the tensor, dtype name)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def weights_sha256(cell_hashes: dict[str, str]) -> str:
    """Hash of a whole model's weights: sha256 over the sorted (name, cell sha256) pairs."""
    h = hashlib.sha256()
    for name in sorted(cell_hashes):
        h.update(f"{name}\t{cell_hashes[name]}\n".encode())
    return h.hexdigest()


def is_code_checkpoint(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


# ---------------------------------------------------------------------------------------------
# safetensors without torch (the format is an 8-byte length, a JSON header, then raw bytes)

_MAX_HEADER = 100 << 20


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """(header, offset of the data section); sizes and offsets are checked against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise KeyError("dtype")
            itemsize = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]].storage).itemsize
            numel = int(np.prod(entry["shape"], dtype=np.int64))
            ok = 0 <= begin <= end <= size - data_start and end - begin == numel * itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: safetensors entry '{key}' is malformed or points outside the file")
    return header, data_start


def read_safetensors_arrays(path: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file as a view of a copy-on-write memory map: no copy, pages
    are read when touched, and writing to an array never reaches the file."""
    header, data_start = read_safetensors_header(path)
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not entries:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    out: dict[str, Tensor] = {}
    for key, entry in entries.items():
        info = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        out[key] = mapped[data_start + begin: data_start + end].view(info.storage).reshape(entry["shape"]), info.name
    return out


def write_safetensors_numpy(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file from storage arrays (readable by `safetensors.torch.load_file`)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, (arr, dtype) in tensors.items():
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype].safetensors, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)  # data section 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for arr, _ in tensors.values():
            f.write(memoryview(contiguous(arr).reshape(-1)).cast("B"))


# ---------------------------------------------------------------------------------------------
# JSON files (config.json, tokenizer.json, ...) as Python literals that write back byte for byte

# dynlm writes JSON in one style (`dynlm.fileio.json_text`); a file in that style is rebuilt from
# its value, any other (a foreign checkpoint's) keeps its exact text next to the value
DYNLM_JSON_STYLE = {"indent": 2, "ensure_ascii": False, "newline": True}
CONFIG_VARIABLES = {"config.json": "CONFIG", "generation_config.json": "GENERATION_CONFIG",
                    "model.safetensors.index.json": "SAFETENSORS_INDEX"}
VOCAB_VARIABLES = {"tokenizer.json": "TOKENIZER", "tokenizer_config.json": "TOKENIZER_CONFIG",
                   "special_tokens_map.json": "SPECIAL_TOKENS_MAP"}


def styled_json(value: Any, style: dict[str, Any]) -> bytes:
    """`value` in a recorded style (code checkpoints written before dynlm had one style recorded
    others; they still read back exactly)."""
    text = json.dumps(value, indent=style["indent"], ensure_ascii=style["ensure_ascii"])
    return (text + ("\n" if style["newline"] else "")).encode("utf-8")


def json_files_module(files: dict[str, bytes], variables: dict[str, str], docstring: str) -> str:
    """A literals file holding JSON files, each under its variable, plus `FILES` saying how to
    write each back exactly (the JSON style that reproduces its bytes, or the raw text)."""
    assignments: list[tuple[str, Any]] = []
    manifest: dict[str, Any] = {}
    for name, raw in files.items():
        variable = variables.get(name) or re.sub(r"[^A-Z0-9]+", "_", Path(name).stem.upper()).strip("_")
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{name}: not valid JSON ({e})") from None
        entry: dict[str, Any] = {"variable": variable, "sha256": hashlib.sha256(raw).hexdigest()}
        style = DYNLM_JSON_STYLE if styled_json(value, DYNLM_JSON_STYLE) == raw else None
        assignments.append((variable, value))
        if style is None:  # formatting we cannot reproduce: keep the exact text too
            entry["raw_variable"] = f"{variable}_TEXT"
            assignments.append((f"{variable}_TEXT", raw.decode("utf-8")))
        else:
            entry["json"] = style
        manifest[name] = entry
    assignments.append(("FILES", manifest))
    return pieces_text(render_module(docstring, assignments))


def json_files_from(parsed: ParsedFile) -> dict[str, bytes]:
    """The JSON files a literals file holds, as bytes. An edited value is written in the file's
    recorded style (so the edit shows up); an untouched one comes back byte for byte."""
    out: dict[str, bytes] = {}
    manifest = parsed.variables.get("FILES", {})
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{parsed.path}: FILES must be a dict")
    for name, entry in manifest.items():
        if not isinstance(entry, dict) or entry.get("variable") not in parsed.variables \
                or not re.match(r"^[A-Za-z0-9_.-]+\.json$", name):
            raise CheckpointError(f"{parsed.path}: FILES entry '{name}' is malformed")
        value = parsed.variables[entry["variable"]]
        raw_name = entry.get("raw_variable")
        if raw_name is not None:
            raw = parsed.variables.get(raw_name)
            if not isinstance(raw, str):
                raise CheckpointError(f"{parsed.path}: FILES entry '{name}' names a missing text '{raw_name}'")
            out[name] = raw.encode("utf-8") if json.loads(raw) == value else styled_json(value, DYNLM_JSON_STYLE)
        else:
            style = entry.get("json")
            if not isinstance(style, dict) or set(style) != {"indent", "ensure_ascii", "newline"}:
                raise CheckpointError(f"{parsed.path}: FILES entry '{name}' has no valid 'json' style")
            out[name] = styled_json(value, style)
    return out


# ---------------------------------------------------------------------------------------------
# Reading


def _inside(root: Path, base: Path, relative: str, what: str, where: str) -> Path:
    """`base / relative`, refusing absolute paths and anything that resolves outside `root`
    (`..`, symlinks)."""
    if not relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative) or "\x00" in relative:
        raise CheckpointError(f"{where}: {what} path '{relative}' must be relative")
    target = (base / relative).resolve()
    root = root.resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(f"{where}: {what} path '{relative}' leads outside {root}")
    return target


def load_vocab_tokenizer(folder: str | Path) -> Any:
    """The tokenizer stored in a code checkpoint's vocab.py, through dynlm's tokenizer loader
    (parses vocab.py only; no torch needed)."""
    vocab = Path(folder) / VOCAB_FILE
    if not vocab.is_file():
        raise CheckpointError(f"{folder}: this code checkpoint has no tokenizer ({VOCAB_FILE})")
    files = {n: b for n, b in json_files_from(parse_file(vocab, "literals")).items() if n.startswith("tokenizer")}
    if "tokenizer.json" not in files:
        raise CheckpointError(f"{vocab}: holds no tokenizer.json")
    with tempfile.TemporaryDirectory(prefix="dynlm-vocab-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(tmp)


class CodeCheckpoint:
    """A code checkpoint folder, parsed (never run). Payloads are decoded on demand and checked
    against their cell's sha256. `shared_root` bounds where `Shared` cells may point (default:
    the folder that contains this checkpoint)."""

    def __init__(self, path: str | Path, shared_root: str | Path | None = None, weights_file: str | Path | None = None,
                 limits: LoadLimits | None = None):
        self.path = Path(path)
        self.limits = limits if limits is not None else default_limits()
        weights_file = Path(weights_file) if weights_file is not None else self.path / WEIGHTS_FILE
        if not weights_file.is_file():
            raise CheckpointError(f"{self.path}: no {WEIGHTS_FILE}; not a code checkpoint")
        parsed = parse_file(weights_file, "weights", self.limits)
        fmt, version = parsed.variables.get("FORMAT"), parsed.variables.get("VERSION")
        if (fmt, version) != (FORMAT_NAME, FORMAT_VERSION) and (fmt, version) != (None, None):
            raise CheckpointError(f"{weights_file}: FORMAT/VERSION are {fmt!r}/{version!r}; this dynlm reads "
                                  f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
        self._setup(weights_file, parsed.variables.get("CELLS", []), parsed.variables.get("MODEL", {}), shared_root)
        self._parsed = parsed  # keeps the file's bytes alive for the payload views

    @classmethod
    def from_cells(cls, folder: str | Path, source_file: str | Path, cells: list[Cell]) -> CodeCheckpoint:
        """A store over cells parsed elsewhere (the parts of a delta); Refs resolve in `folder`."""
        store = cls.__new__(cls)
        store.path = Path(folder)
        store.limits = default_limits()
        store._setup(Path(source_file), cells, {}, None)
        return store

    def _setup(self, weights_file: Path, cells: list[Cell], model_info: dict[str, Any],
               shared_root: str | Path | None) -> None:
        self.weights_file = weights_file
        self.model_info: dict[str, Any] = model_info
        self.cells: dict[str, Cell] = {}
        declared = 0
        for cell in cells:
            if cell.name in self.cells:
                raise CheckpointError(f"{weights_file}: line {cell.lineno}: cell '{cell.name}' appears twice")
            self.cells[cell.name] = cell
            try:  # every declared size against its payload, before anything is decoded or allocated
                check_payload_size(cell.data, cell.numel, cell.dtype)
            except PayloadError as e:
                raise CheckpointError(f"{weights_file}: line {cell.lineno}: cell '{cell.name}': {e}") from None
            declared += cell.nbytes
        if declared > self.limits.tensor_bytes:
            raise over_budget(weights_file, "bytes of tensors declared", declared, "tensor_bytes",
                              self.limits.tensor_bytes)
        self.shared_root = Path(shared_root) if shared_root is not None else self.path.resolve().parent
        self.decode_count = 0  # payloads decoded (a Shared cell counts one)
        self._count_lock = threading.Lock()
        self._literals: dict[str, ParsedFile] = {}
        self._shared: dict[Path, CodeCheckpoint] = {}
        self._blobs: dict[Path, dict[str, Tensor]] = {}

    # -- metadata -------------------------------------------------------------------------------
    def literals(self, file: str) -> ParsedFile:
        if file not in self._literals:
            self._literals[file] = parse_file(self.path / file, "literals", self.limits)
        return self._literals[file]

    @property
    def config(self) -> dict[str, Any]:
        """config.json of the checkpoint (with its `dynlm` section)."""
        config = self.literals(CONFIG_FILE).variables.get("CONFIG")
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path / CONFIG_FILE}: no CONFIG dict")
        return config

    def json_files(self) -> dict[str, bytes]:
        """Every JSON file of the original checkpoint (config, tokenizer), byte for byte."""
        files = json_files_from(self.literals(CONFIG_FILE))
        if (self.path / VOCAB_FILE).is_file():
            files.update(json_files_from(self.literals(VOCAB_FILE)))
        return files

    def where(self, cell: Cell) -> str:
        return f"{self.weights_file}: line {cell.lineno}: cell '{cell.name}'"

    def select(self, patterns: Iterable[str] | str | None) -> list[str]:
        """Cell names matching any pattern: a glob ("model.layers.0.*"), a name or name prefix
        ("model.layers.0"), or an alias: "embedding", "head", "norm", "layer_3"."""
        if patterns is None:
            return list(self.cells)
        if isinstance(patterns, str):
            patterns = [p.strip() for p in patterns.split(",") if p.strip()]
        names = []
        for given in patterns:
            pattern = _ALIASES.get(given, given)
            layer = re.fullmatch(r"layers?[_.]?(\d+)", pattern)
            if layer:
                pattern = f"*layers.{layer.group(1)}.*"
            hits = [n for n in self.cells if fnmatch.fnmatchcase(n, pattern) or n.startswith(pattern + ".")
                    or n == pattern]
            if not hits:
                raise CheckpointError(f"{self.path}: no cell matches '{given}'",
                                      did_you_mean(given, self.cells) or "see `dynlm weights show`")
            names += [n for n in hits if n not in names]
        return [n for n in self.cells if n in names]  # file order

    # -- payloads -------------------------------------------------------------------------------
    def array(self, name: str, verify: bool = True) -> np.ndarray:
        """The tensor `name` as a storage array (bfloat16 as uint16 bits), shaped, verified."""
        if name not in self.cells:
            raise CheckpointError(f"{self.weights_file}: no cell '{name}'")
        cell = self.cells[name]
        flat = self._decode(cell)
        with self._count_lock:
            self.decode_count += 1
        if verify and cell.sha256 is not None:
            actual = cell_sha256(flat, cell.dtype, cell.shape)
            if actual != cell.sha256:
                raise CheckpointError(
                    f"{self.where(cell)}: sha256 mismatch: the payload hashes to {actual[:16]}..., the cell "
                    f"says {cell.sha256[:16]}...",
                    f"if you edited this cell on purpose, run `dynlm weights rehash {self.path}`")
        return flat.reshape(cell.shape)

    def _decode(self, cell: Cell) -> np.ndarray:
        payload, numel = cell.data, cell.numel
        try:
            if isinstance(payload, Literal):
                return decode_literal(payload, numel, cell.dtype)
            if isinstance(payload, Inline):
                return decode_inline(payload, numel, cell.dtype)
        except PayloadError as e:
            raise CheckpointError(f"{self.where(cell)}: {e}") from None
        if isinstance(payload, Ref):
            file = _inside(self.path, self.path, payload.file, "Ref", self.where(cell))
            if not file.is_file():
                raise CheckpointError(f"{self.where(cell)}: Ref file '{payload.file}' is missing")
            if file not in self._blobs:
                self._blobs[file] = read_safetensors_arrays(file)
            if payload.key not in self._blobs[file]:
                raise CheckpointError(f"{self.where(cell)}: '{payload.file}' has no tensor '{payload.key}'")
            arr, dtype = self._blobs[file][payload.key]
            if dtype != cell.dtype or tuple(arr.shape) != tuple(cell.shape):
                raise CheckpointError(f"{self.where(cell)}: Ref '{payload.key}' is {dtype}{list(arr.shape)}, "
                                      f"the cell says {cell.dtype}{list(cell.shape)}")
            return arr.reshape(-1)
        if isinstance(payload, Shared):
            return self._decode_shared(cell, payload)
        raise CheckpointError(f"{self.where(cell)}: unknown payload")

    def _decode_shared(self, cell: Cell, payload: Shared) -> np.ndarray:
        if cell.sha256 is None:
            raise CheckpointError(f"{self.where(cell)}: a Shared cell needs its sha256 (that is how it is verified)")
        target = _inside(self.shared_root, self.path, payload.path, "Shared", self.where(cell))
        if target.suffix != ".py" or not target.is_file():
            raise CheckpointError(f"{self.where(cell)}: Shared file '{payload.path}' is not an existing .py file")
        if target not in self._shared:  # a shared file may hold Refs next to itself, nothing further
            self._shared[target] = CodeCheckpoint(target.parent, shared_root=target.parent, weights_file=target,
                                                  limits=self.limits)
        other = self._shared[target]
        if payload.name not in other.cells:
            raise CheckpointError(f"{self.where(cell)}: '{payload.path}' has no cell '{payload.name}'")
        source = other.cells[payload.name]
        if isinstance(source.data, Shared):
            raise CheckpointError(f"{self.where(cell)}: '{payload.path}' cell '{payload.name}' is itself Shared "
                                  "(shared cells must hold their data)")
        if source.dtype != cell.dtype or tuple(source.shape) != tuple(cell.shape):
            raise CheckpointError(f"{self.where(cell)}: shared cell is {source.dtype}{list(source.shape)}, "
                                  f"this cell says {cell.dtype}{list(cell.shape)}")
        return other._decode(source)

    def arrays(self, names: Iterable[str] | None = None, workers: int | None = None,
               verify: bool = True) -> dict[str, np.ndarray]:
        """Decode several cells in parallel (zlib, base85 and sha256 release the GIL)."""
        names = list(self.cells) if names is None else list(names)
        workers = workers or default_workers()
        order = sorted(names, key=lambda n: -self.cells[n].nbytes if n in self.cells else 0)
        if workers <= 1 or len(names) <= 1:
            results = {n: self.array(n, verify) for n in order}
        else:
            with ThreadPoolExecutor(workers) as pool:
                results = dict(zip(order, pool.map(lambda n: self.array(n, verify), order)))
        return {n: results[n] for n in names}

    def cell_hashes(self) -> dict[str, str]:
        """sha256 of every cell (decoding only the cells whose hash is not written down)."""
        return {n: c.sha256 if c.sha256 is not None else cell_sha256(self.array(n), c.dtype)
                for n, c in self.cells.items()}

    @property
    def weights_sha256(self) -> str:
        return weights_sha256(self.cell_hashes())


_ALIASES = {"embedding": "model.embed_tokens.*", "embeddings": "model.embed_tokens.*", "head": "lm_head.*",
            "lm_head": "lm_head.*", "norm": "model.norm.*", "final_norm": "model.norm.*"}


# ---------------------------------------------------------------------------------------------
# Writing


def make_payload(arr: np.ndarray, dtype: str, mode: str, literal_max: int) -> Literal | Inline | None:
    """Literal for small (at most 1-D) tensors, Inline otherwise; None means "a Ref" (hybrid)."""
    if arr.size <= literal_max and (arr.ndim <= 1 or arr.size <= 16):
        literal = encode_literal(arr, dtype)
        if literal is not None:
            return literal
    if mode == "hybrid":
        return None
    return encode_inline(arr)


def build_cells(tensors: dict[str, Tensor], mode: str = "inline", literal_max: int = DEFAULT_LITERAL_MAX,
                previous: dict[str, Cell] | None = None, event: dict[str, Any] | None = None,
                notes: dict[str, str] | None = None, blob_file: str = BLOBS_FILE,
                workers: int | None = None) -> tuple[list[Cell], dict[str, Tensor]]:
    """Cells for `tensors` (+ the tensors that go to the blob file in hybrid mode).

    History: a cell keeps the history of the same-named cell in `previous`; when its bytes
    differ from that cell (or there is none), `event` (default: "created") is appended."""
    if mode not in ("inline", "hybrid"):
        raise CheckpointError(f"unknown mode '{mode}'", "use 'inline' or 'hybrid'")
    previous = previous or {}
    notes = notes or {}
    stamp = now()

    def one(name: str) -> Cell:
        arr, dtype = tensors[name]
        arr = contiguous(arr)
        digest = cell_sha256(arr, dtype)
        payload = make_payload(arr, dtype, mode, literal_max)
        if payload is None:
            payload = Ref(blob_file, name)
        before = previous.get(name)
        history = list(before.history) if before is not None else []
        if before is None or before.sha256 != digest:
            history.append({"event": "created", "time": stamp} if before is None and event is None
                           else {**(event or {"event": "changed"}), "time": stamp})
        note = notes.get(name, before.note if before is not None else "")
        return Cell(name=name, shape=tuple(arr.shape), dtype=dtype, sha256=digest, data=payload,
                    stats=tensor_stats(arr, dtype), note=note, history=history)

    names = list(tensors)
    order = sorted(names, key=lambda n: -tensors[n][0].size * tensors[n][0].dtype.itemsize)
    workers = workers or default_workers()
    if workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(workers) as pool:
            built = dict(zip(order, pool.map(one, order)))
    else:
        built = {n: one(n) for n in order}
    cells = [built[n] for n in names]
    blobs = {c.name: (contiguous(tensors[c.name][0]), c.dtype) for c in cells if isinstance(c.data, Ref)}
    return cells, blobs


def convert_dtype(tensors: dict[str, Tensor], dtype: str | None) -> dict[str, Tensor]:
    """Floating tensors cast to `dtype` (round to nearest even); others unchanged."""
    if dtype is None:
        return tensors
    if dtype not in DTYPES or DTYPES[dtype].kind != "float":
        raise CheckpointError(f"cannot store weights as '{dtype}'", "use float32, float16 or bfloat16")
    out = {}
    for name, (arr, current) in tensors.items():
        if DTYPES[current].kind == "float" and current != dtype:
            out[name] = (from_float(as_float(arr, current), dtype).reshape(arr.shape), dtype)
        else:
            out[name] = (arr, current)
    return out


WEIGHTS_DOC = """Weights of a dynlm model as code: {cells} cells, {params:,} parameters ({dtypes}).

dynlm reads this file with a safe loader that parses it and never runs it:
    import dynlm; model = dynlm.load_pretrained("<this folder>")
Each Cell is one tensor: name, shape, dtype, sha256 (of b"<dtype>[<shape>]" + its raw little-endian bytes),
statistics, a note, its history, and its data:
    Literal([...])                 the values (C order); edit one, then `dynlm weights rehash <folder>`
    Inline(planes=..., b85="...")  byte planes (plane i = byte i of every element), each "raw" or "zlib",
                                   concatenated and base85-encoded (base64.b85decode reads it)
    Ref(file, key)                 a tensor of a safetensors file in this folder
    Shared(path, name)             a cell of another code file, verified against this cell's sha256"""

LOADER_STUB = '''"""Load this code checkpoint. The .py files here are data: dynlm's safe loader parses them
with `ast` and never imports or runs them.

    python loader.py                  # summary of the cells
    import dynlm; model = dynlm.load_pretrained("path/to/this/folder")
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(device="cpu", dtype=None):
    import dynlm

    return dynlm.load_pretrained(HERE, device=device, dtype=dtype)


if __name__ == "__main__":
    from dynlm.weights.store import CodeCheckpoint

    checkpoint = CodeCheckpoint(HERE)
    for cell in checkpoint.cells.values():
        print(f"{cell.name:60s} {cell.dtype:9s} {str(list(cell.shape)):18s} {type(cell.data).__name__}")
'''


def render_weights(cells: list[Cell], model_info: dict[str, Any]) -> list[Any]:
    dtypes = sorted({c.dtype for c in cells})
    doc = WEIGHTS_DOC.format(cells=len(cells), params=sum(c.numel for c in cells), dtypes=", ".join(dtypes))
    return render_module(doc, [("FORMAT", FORMAT_NAME), ("VERSION", FORMAT_VERSION), ("MODEL", model_info),
                               ("CELLS", cells)], with_import=True)


def model_header(cells: list[Cell], base: dict[str, Any], mode: str) -> dict[str, Any]:
    """MODEL = {...}: what the file holds, its weights hash, parents and history."""
    info = {k: v for k, v in base.items() if k not in ("cells", "parameters", "weights_sha256", "mode")}
    return {"architecture": base.get("architecture"), "mode": mode, "cells": len(cells),
            "parameters": sum(c.numel for c in cells),
            "weights_sha256": weights_sha256({c.name: c.sha256 for c in cells}),
            **{k: v for k, v in info.items() if k != "architecture"},
            "parents": base.get("parents", []), "history": base.get("history", [])}


def write_folder(out_dir: str | Path, cells: list[Cell], model_info: dict[str, Any], files: dict[str, bytes],
                 blobs: dict[str, Tensor] | None = None, extra: dict[str, bytes] | None = None) -> Path:
    """Write a whole code checkpoint folder atomically (a failed write leaves `out_dir` as it was)."""
    out_dir = Path(out_dir)
    config_files = {n: b for n, b in files.items() if n not in VOCAB_VARIABLES and not n.startswith("tokenizer")}
    vocab_files = {n: b for n, b in files.items() if n not in config_files}
    if "config.json" not in config_files:
        raise CheckpointError("a code checkpoint needs config.json")
    with atomic_directory(out_dir) as tmp:
        (tmp / CONFIG_FILE).write_text(json_files_module(
            config_files, CONFIG_VARIABLES, "Configuration of a dynlm model (config.json as a Python literal)."))
        if vocab_files:
            (tmp / VOCAB_FILE).write_text(json_files_module(
                vocab_files, VOCAB_VARIABLES, "Tokenizer of a dynlm model (tokenizer.json as Python literals)."),
                encoding="utf-8")
        with open(tmp / WEIGHTS_FILE, "wb") as f:
            write_pieces(f, render_weights(cells, model_info))
        (tmp / LOADER_FILE).write_text(LOADER_STUB)
        if blobs:
            write_safetensors_numpy(tmp / BLOBS_FILE, blobs, {"format": "dynlm-weights-as-code"})
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def rewrite_weights_file(path: Path, cells: list[Cell], model_info: dict[str, Any]) -> None:
    """Replace weights.py alone (annotations, rehash), atomically; payload text is copied as is."""
    pieces = render_weights(cells, model_info)
    with atomic_open(path) as f:
        write_pieces(f, pieces)
