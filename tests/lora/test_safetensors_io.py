"""Streaming safetensors (lora_cli/lora/safetensors_io.py): what the reader returns is
what the safetensors library loads, a sampled read equals indexing the full tensor and
reads only the sampled bytes, what the writer writes the library loads back, and a
header that breaks the format's rules is a ModelError naming the rule, never a crash."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import lora_cli.lora.safetensors_io as sio
from lora_cli.lora.errors import ModelError
from lora_cli.lora.safetensors_io import SafetensorsReader, SafetensorsWriter, StoredTensor, read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
tensor_specs = st.dictionaries(st.text("abcxyz._0123456789", min_size=1, max_size=8),
                               st.tuples(shapes, st.sampled_from(DTYPES)), min_size=1, max_size=5)


@SETTINGS
@given(specs=tensor_specs, seed=st.integers(0, 1000))
def test_the_reader_returns_what_the_library_loads(tmp_path, specs, seed):
    tensors = {k: make(s, d, seed + i) for i, (k, (s, d)) in enumerate(specs.items())}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "who": "test"})
    reader = SafetensorsReader(path)
    loaded = load_file(path)
    assert set(reader.keys) == set(loaded) and reader.metadata == {"format": "pt", "who": "test"}
    for k, t in reader:
        assert t.dtype == loaded[k].dtype and torch.equal(t, loaded[k]), k
        assert reader.specs[k] == (tuple(loaded[k].shape), loaded[k].dtype)


@SETTINGS
@given(specs=tensor_specs, seed=st.integers(0, 1000), metadata=st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
def test_what_the_writer_writes_the_library_loads_in_the_given_order(tmp_path, specs, seed, metadata):
    tensors = {k: make(s, d, seed + i) for i, (k, (s, d)) in enumerate(specs.items())}
    path = tmp_path / "w.safetensors"
    with SafetensorsWriter(path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
    assert path.stat().st_size == w.total
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    tensors_, meta, start = read_header(path)
    assert list(tensors_) == list(tensors) and meta == metadata and start % 8 == 0


@SETTINGS
@given(numel=st.integers(1, 400), dtype=st.sampled_from(DTYPES), data=st.data())
def test_a_sampled_read_equals_indexing_the_full_tensor_and_reads_only_the_samples(tmp_path, monkeypatch, numel,
                                                                                   dtype, data):
    full = make((numel,), dtype, numel).reshape(-1)
    path = tmp_path / "s.safetensors"
    save_file({"other": torch.zeros(3), "w": full.reshape(numel, 1)}, str(path))
    positions = sorted(data.draw(st.sets(st.integers(0, numel - 1), max_size=numel)))
    reader = SafetensorsReader(path)
    read: list[int] = []
    real = os.pread
    monkeypatch.setattr(sio.os, "pread", lambda fd, n, off: read.append(n) or real(fd, n, off))
    got = StoredTensor(reader, "w").sample(positions)
    assert got.dtype == dtype and got.shape == (len(positions),)
    assert torch.equal(got, full[torch.tensor(positions, dtype=torch.int64)])
    if len(positions) * 4 < numel:           # a few elements of a larger tensor: only their bytes
        assert sum(read) == len(positions) * dtype.itemsize
    monkeypatch.undo()


def test_stored_tensors_know_shape_and_dtype_before_any_read(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    save_file({"a": torch.ones(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4, dtype=torch.int32)}, str(path))
    reader = SafetensorsReader(path)
    monkeypatch.setattr(SafetensorsReader, "get", lambda *a: pytest.fail("read a tensor"))
    stored = dict(reader.stored())
    assert {k: (s.shape, s.dtype) for k, s in stored.items()} == {"a": ((2, 3), torch.bfloat16),
                                                                   "b": ((4,), torch.int32)}


def test_the_writer_refuses_tensors_out_of_order_or_of_another_shape_and_an_early_close(tmp_path):
    specs = {"a": ((2,), torch.float32), "b": ((3,), torch.float32)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2"):
        w.close()


# --- malformed files -------------------------------------------------------------------

def file_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
EIGHT = b"\x00" * 8


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "shorter than a safetensors header"),
    (file_bytes(GOOD, EIGHT, length=10**6), "runs past the end of the file"),
    (file_bytes(GOOD, EIGHT, length=sio.MAX_HEADER_BYTES + 1), "more than the"),
    (file_bytes(b"\xff\xfe{}"), "not UTF-8"),
    (file_bytes(b"{not json"), "not valid JSON"),
    (file_bytes(b'{"w": {}, "w": {}}'), "appears twice"),
    (file_bytes(b"[1, 2]"), "not an object"),
    (file_bytes(b"[" * 5000 + b"]" * 5000), "nested too deeply"),
    (file_bytes({**GOOD, "__metadata__": {"a": 1}}, EIGHT), "__metadata__ must map strings to strings"),
    (file_bytes({"w": 3}, EIGHT), "not an object"),
    (file_bytes({"w": {**GOOD["w"], "dtype": "F33"}}, EIGHT), "unknown dtype"),
    (file_bytes({"w": {**GOOD["w"], "shape": [-2]}}, EIGHT), "the shape must be"),
    (file_bytes({"w": {**GOOD["w"], "shape": [1] * 65}}, EIGHT), "the shape must be"),
    (file_bytes({"w": {**GOOD["w"], "data_offsets": [8, 0]}}, EIGHT), "data_offsets must be"),
    (file_bytes({"w": {**GOOD["w"], "data_offsets": [0, 16]}}, EIGHT), "truncated?"),
    (file_bytes({"w": {**GOOD["w"], "shape": [3]}}, EIGHT), "does not take the 8 bytes"),
    (file_bytes({"w": {**GOOD["w"], "data_offsets": [4, 12]}}, EIGHT * 2), "leaves a gap at byte 0"),
    (file_bytes({**GOOD, "v": {**GOOD["w"], "data_offsets": [4, 12]}}, EIGHT * 2), "overlaps"),
    (file_bytes(GOOD, EIGHT + b"\x00"), "bytes appended"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_header_that_breaks_a_rule_is_refused_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        SafetensorsReader(path)
    assert message in info.value.what and info.value.where == str(path)


def test_a_missing_file_or_a_directory_is_refused(tmp_path):
    for path, message in ((tmp_path / "nope.safetensors", "file not found"), (tmp_path, "not a regular file")):
        with pytest.raises(ModelError, match=message):
            read_header(path)


@SETTINGS
@given(data=st.data())
def test_any_corruption_of_a_valid_file_reads_exactly_or_is_a_model_error(tmp_path, data):
    path = tmp_path / "c.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.int8)},
              str(path))
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "grow"]))
        if kind == "flip" and raw:
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += bytes(data.draw(st.binary(max_size=16)))
    path.write_bytes(bytes(raw))
    try:
        reader = SafetensorsReader(path)
    except ModelError:
        return
    loaded = load_file(path)              # whatever we accept, the library reads the same way
    assert set(loaded) == set(reader.keys)
    for k, t in reader:
        assert torch.equal(t, loaded[k]) or (t.dtype.is_floating_point and torch.equal(t.isnan(), loaded[k].isnan()))
