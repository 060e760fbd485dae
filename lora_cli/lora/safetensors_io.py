"""Reading and writing weight files one tensor at a time.

A merged model is written while it is computed, so peak memory stays near one tensor
plus what is being written, however large the base. safetensors keeps a JSON header
(names, dtypes, shapes, byte offsets) before the data; every shape and dtype is known
from the base's header before any tensor is read, so the output header is written
first and the tensors follow in order:

    [u64 little-endian header size][JSON header, space-padded to 8 bytes][tensor bytes...]

Every safetensors file lora-cli reads (bases, adapters, merged outputs) goes through
:func:`read_header` first, which checks the header against the format's rules before
anything trusts it; a model directory's shard index goes through :func:`read_index`.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .checks import is_int, parse_json, show
from .errors import ModelError

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100_000_000   # the safetensors library refuses larger headers too
MAX_DIMS = 64


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: a key written twice is an error, not "the last one wins"."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {show(key)} appears twice")
        out[key] = value
    return out


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype, int, int]],
                                                    dict[str, str], int]:
    """The validated header of a safetensors file: ``(tensors, metadata, data_start)``,
    with ``tensors`` mapping each name to (shape, dtype, start, end), byte offsets
    relative to ``data_start``, in file order.

    The file's own rules, all checked (a ModelError names the first one broken): an
    8-byte length, then that many bytes of UTF-8 JSON (at most 100 MB) holding an object;
    ``__metadata__``, if present, maps strings to strings; every other entry is an object
    with a known ``dtype``, a ``shape`` of non-negative integers and two integer
    ``data_offsets`` spanning exactly shape x itemsize bytes; the tensors tile the data
    that follows the header, from its first byte to the end of the file, without gaps
    or overlaps; no name appears twice.
    """
    path = Path(path)
    try:
        if not path.is_file():     # a FIFO or a device would block or never end
            raise ValueError("not a regular file" if path.exists() else "file not found")
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"the file is {size} bytes, shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"the header claims {length:,} bytes, more than the {MAX_HEADER_BYTES:,} allowed")
            if length > size - 8:
                raise ValueError(f"header length {length} runs past the end of the file ({size} bytes)")
            raw = fh.read(length)
    except OSError as exc:
        raise _corrupt(path, exc.strerror or str(exc)) from None
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from None
    try:
        header = parse_json(raw, "the header", pairs_hook=_unique_keys)
    except ValueError as exc:
        raise _corrupt(path, str(exc)) from None
    tensors, metadata = _check_header(header, size - 8 - length, path)
    return tensors, metadata, 8 + length


def _check_header(header, data_size: int, path: Path) -> tuple[dict, dict[str, str]]:
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {show(name)}"
        if not isinstance(info, dict):
            raise _corrupt(path, f"{where}: the entry is {show(info)}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in CODE_DTYPES:
            raise _corrupt(path, f"{where}: unknown dtype {show(dtype)} (known: {', '.join(CODE_DTYPES)})")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_int(s) and s >= 0 for s in shape):
            raise _corrupt(path, f"{where}: the shape must be a list of at most {MAX_DIMS} integers >= 0, "
                                 f"got {show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _corrupt(path, f"{where}: data_offsets must be two integers 0 <= start <= end, "
                                 f"got {show(offsets)}")
        start, end = offsets
        if end > data_size:
            raise _corrupt(path, f"{where} ends at byte {end} of the data, which has {data_size} (truncated?)")
        if _numel(shape) * _itemsize(CODE_DTYPES[dtype]) != end - start:
            raise _corrupt(path, f"{where}: shape {shape} of {dtype} does not take the {end - start} bytes "
                                 "its offsets give")
        entries.append((start, end, name, tuple(shape), CODE_DTYPES[dtype]))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for start, end, name, _, _ in entries:
        if start != position:
            what = "overlaps the tensor before it" if start < position else f"leaves a gap at byte {position}"
            raise _corrupt(path, f"tensor {show(name)} {what} (data_offsets must tile the data)")
        position = end
    if position != data_size:
        raise _corrupt(path, f"the tensors cover {position} bytes of data but the file holds {data_size} "
                             "(truncated, or bytes appended)")
    return {name: (shape, dtype, start, end) for start, end, name, shape, dtype in entries}, dict(metadata)


def _corrupt(path: Path, detail: str) -> ModelError:
    return ModelError(f"cannot read safetensors file: {detail}", where=str(path),
                      fix="the file is truncated or corrupt; copy or export it again")


class SafetensorsReader:
    """Lazy access to one .safetensors file: names, shapes and dtypes from the header,
    each tensor read with plain file reads only when asked for.

    Not memory-mapped on purpose: pages of a mapping stay resident (and count in RSS)
    until it is closed, so streaming a large file through a mapping ends up holding all
    of it; a read into a fresh buffer holds one tensor at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        tensors, self.metadata, self._data_start = read_header(self.path)
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {k: (s, d) for k, (s, d, _, _) in tensors.items()}
        self._offsets: dict[str, tuple[int, int]] = {k: (a, b) for k, (_, _, a, b) in tensors.items()}
        self.keys = list(self.specs)

    def get(self, key: str) -> torch.Tensor:
        shape, dtype = self.specs[key]
        start, end = self._offsets[key]
        buffer = bytearray(end - start)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + start)
            if fh.readinto(buffer) != len(buffer):
                raise ModelError(f"tensor {key!r} is cut short", where=str(self.path),
                                 fix="the file is truncated; copy or export it again")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys:
            yield k, self.get(k)

    def stored(self) -> Iterator[tuple[str, "StoredTensor"]]:
        """(name, tensor on disk) for every tensor, nothing read yet."""
        for k in self.keys:
            yield k, StoredTensor(self, k)

    def read_elements(self, key: str, positions: list[int]) -> torch.Tensor:
        """The elements of ``key`` at flat ``positions`` (ascending), as a 1-D tensor,
        reading only their bytes."""
        shape, dtype = self.specs[key]
        start, end = self._offsets[key]
        size = _itemsize(dtype)
        if len(positions) * 4 >= _numel(shape):          # most of a small tensor: read it whole
            whole = self.get(key).reshape(-1)
            return whole[torch.tensor(positions, dtype=torch.int64)] if positions else whole[:0]
        chunks = bytearray()
        with open(self.path, "rb") as fh:
            for pos in positions:
                offset = self._data_start + start + pos * size
                if not 0 <= pos * size < end - start:
                    raise IndexError(f"position {pos} is outside tensor {key!r}")
                chunks += os.pread(fh.fileno(), size, offset)
        if len(chunks) != len(positions) * size:
            raise ModelError(f"tensor {key!r} is cut short", where=str(self.path),
                             fix="the file is truncated; copy or export it again")
        return torch.frombuffer(chunks, dtype=dtype) if chunks else torch.empty(0, dtype=dtype)


class StoredTensor:
    """A tensor in a safetensors file, known by shape and dtype; ``sample`` reads only
    the elements asked for (what a base fingerprint needs of a multi-GB tensor)."""

    def __init__(self, reader: SafetensorsReader, key: str):
        self.reader, self.key = reader, key
        self.shape, self.dtype = reader.specs[key]

    def sample(self, positions: list[int]) -> torch.Tensor:
        return self.reader.read_elements(self.key, positions)


class SafetensorsWriter:
    """Writes tensors to a .safetensors file in a fixed order, one at a time.

    ``specs`` maps each name to (shape, dtype) in writing order; :meth:`write` must then
    be called once per name in that order. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.order = list(specs)
        self.specs = dict(specs)
        header: dict = {}
        offset = 0
        for name in self.order:
            shape, dtype = specs[name]
            nbytes = _numel(shape) * _itemsize(dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = dict(metadata)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total = 8 + len(raw) + offset
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next]
        shape, dtype = self.specs[name]
        if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"SafetensorsWriter expected {expected} {shape} {dtype}, "
                             f"got {name} {tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._fh.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
        self._next += 1

    def close(self) -> None:
        if self._fh.closed:
            return
        try:
            if self._next != len(self.order):
                raise ValueError(f"SafetensorsWriter closed after {self._next} of {len(self.order)} tensors")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize

