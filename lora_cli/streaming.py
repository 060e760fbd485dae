"""Reading and writing weight files one tensor at a time.

A merged model is written while it is computed, so peak memory stays near one tensor
plus what is being written, however large the base. safetensors keeps a JSON header
(names, dtypes, shapes, byte offsets) before the data; every shape and dtype is known
from the base's header before any tensor is read, so the output header is written
first and the tensors follow in order:

    [u64 little-endian header size][JSON header, space-padded to 8 bytes][tensor bytes...]
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .errors import ModelError
from .files import inside

DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsReader:
    """Lazy access to one .safetensors file: names, shapes and dtypes from the header,
    each tensor read with plain file reads only when asked for.

    Not memory-mapped on purpose: pages of a mapping stay resident (and count in RSS)
    until it is closed, so streaming a large file through a mapping ends up holding all
    of it; a read into a fresh buffer holds one tensor at a time.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than a safetensors header")
                (length,) = struct.unpack("<Q", head)
                if length > size - 8:
                    raise ValueError(f"header length {length} runs past the end of the file ({size} bytes)")
                header = json.loads(fh.read(length))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read safetensors file: {exc}", where=str(self.path),
                             fix="the file is truncated or corrupt; copy or export it again") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        try:
            for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                shape, dtype = tuple(int(s) for s in info["shape"]), CODE_DTYPES[info["dtype"]]
                start, end = (int(o) for o in info["data_offsets"])
                if end - start != _numel(shape) * _itemsize(dtype) or self._data_start + end > size:
                    raise ValueError(f"tensor {key!r} does not fit the file (truncated?)")
                self.specs[key] = (shape, dtype)
                self._offsets[key] = (start, end)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"cannot read safetensors file: invalid header ({exc})", where=str(self.path),
                             fix="the file is truncated or corrupt; copy or export it again") from None
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
    return torch.empty((), dtype=dtype).element_size()


def index_files(directory: str | os.PathLike, name: str = INDEX_NAME) -> list[Path]:
    """The files a shard index in ``directory`` names (its ``weight_map`` values), checked:
    each must be a plain file name in the directory, not a path that leaves it (``../x``,
    an absolute path, a symlink pointing out), and must exist."""
    directory = Path(directory)
    index = directory / name
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"invalid shard index: {type(exc).__name__}: {exc}", where=str(index),
                         fix="the index must be a JSON object whose weight_map maps tensor names to shard "
                             "file names") from None
    for f in sorted(names, key=str):
        if not isinstance(f, str) or not f or Path(f).name != f or f in (".", ".."):
            raise ModelError(f"the index names the shard {f!r}, which is not a file name in this folder",
                             where=str(index), fix="shard entries are plain file names beside the index")
        if (directory / f).is_symlink() and not inside(directory, directory / f):
            raise ModelError(f"the shard {f!r} is a symlink to {os.path.realpath(directory / f)}, outside the "
                             "model folder", where=str(index), fix=RESOLVE_LINKS)
        if not (directory / f).is_file():
            raise ModelError(f"shard {f} named by the index is missing", where=str(index))
    return [directory / f for f in sorted(names)]


RESOLVE_LINKS = ("lora-cli reads nothing from outside the folder you name; if the links are yours (a Hugging Face "
                  "cache snapshot, say), copy the folder with its links resolved (cp -rL) and use the copy")


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, or the
    single ``model.safetensors``; none of them may lie outside the directory."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        return index_files(directory)
    files = sorted(directory.glob("*.safetensors"))
    if len(files) == 1:
        if not inside(directory, files[0]):
            raise ModelError(f"{files[0].name} is a symlink to {os.path.realpath(files[0])}, outside the model "
                             "folder", where=str(directory), fix=RESOLVE_LINKS)
        return files
    raise ModelError("no model.safetensors (or shard index) in this directory" if not files else
                     f"{len(files)} safetensors files but no {INDEX_NAME}", where=str(directory),
                     fix="point to a .safetensors/.pt file, or a model directory saved with save_pretrained")
