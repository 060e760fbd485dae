"""Weight files on disk: read without running code, written atomically.

Reading never unpickles arbitrary objects: ``.safetensors`` files hold only tensors (their
header checked by :func:`lora_cli.lora.safetensors_io.read_header` first), and
``.pt``/``.pth``/``.bin`` files go through ``torch.load(..., weights_only=True)``, which
refuses any pickle that would import or call something. Either way the result must be a
flat mapping of ``str -> Tensor`` (plain dense tensors). A NaN or inf in a base is found
by :func:`check_finite`, naming the tensor.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from .errors import ModelError
from .files import write_atomic, write_error
from .names import DTYPE_NAMES
from .safetensors_io import read_header

SAFETENSORS_SUFFIXES = (".safetensors",)


PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def _convert_snippet(path: Path) -> str:
    """A one-liner that rewrites a trusted pickle as safetensors (it does unpickle!)."""
    out = path.with_suffix(".safetensors")
    return (
        "python -c \"import torch; from safetensors.torch import save_file; "
        f"obj = torch.load({str(path)!r}, map_location='cpu', weights_only=False); "
        "sd = obj.state_dict() if hasattr(obj, 'state_dict') else obj; "
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, {str(out)!r})\""
    )


def _describe(value: object) -> str:
    """A short name for what a non-tensor value is: 'a dict with 12 entries', 'an int'."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    if isinstance(value, (Mapping, list, tuple)):
        return f"{article} {name} with {len(value)} entries"
    return f"{article} {name}"


def _check_flat_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """``obj`` as a plain ``dict[str, Tensor]``, or a ModelError saying what it is instead."""
    if not isinstance(obj, Mapping):
        raise ModelError(
            f"the file holds {_describe(obj)}, not a state dict (a mapping of names to tensors)",
            where=str(path),
            fix="save model.state_dict() (not the model or a list), preferably with safetensors.torch.save_file",
        )
    if not obj:
        raise ModelError("the file holds an empty state dict (no tensors)", where=str(path),
                         fix="save model.state_dict() of the trained model")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ModelError(
                f"the state dict has a non-string key {key!r} ({type(key).__name__})",
                where=str(path),
                fix="save model.state_dict(), whose keys are parameter names like 'layers.0.weight'",
            )
        if not isinstance(value, torch.Tensor):
            nested = isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())
            fix = (
                f"this looks like a training checkpoint; save just the weights: "
                f"torch.save(ckpt[{key!r}], 'base.pt')"
                if nested else
                "save a flat mapping of parameter names to tensors, e.g. model.state_dict()"
            )
            raise ModelError(f"key {key!r} holds {_describe(value)}, not a tensor", where=str(path), fix=fix)
        if value.layout is not torch.strided or value.is_quantized or value.device.type != "cpu":
            raise ModelError(f"key {key!r} holds a {str(value.layout).removeprefix('torch.')}"
                             f"{' quantized' if value.is_quantized else ''} tensor on {value.device.type}, "
                             "not a plain dense one", where=str(path),
                             fix="save plain dense tensors (tensor.to_dense(), dequantize())")
    return dict(obj)


def is_pickle(path: Path) -> bool:
    """Whether a file starts as torch.save's zip archive or a pickle (protocol 2 or later) does."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors in a ``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` file, on the CPU.

    Never runs code from the file. Raises ModelError if the file is missing, has another
    extension, is truncated or corrupt, holds a pickle that would run code when loaded,
    or holds anything but a flat ``str -> Tensor`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a weights file" if path.is_dir() else "weights file not found"
        raise ModelError(what, where=str(path),
                         fix="check the path (relative paths are relative to the current directory)")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        read_header(path)   # checked by lora-cli's own rules first: a ModelError naming what is wrong
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(
                f"not a readable safetensors file ({e}); it is probably truncated or corrupt",
                where=str(path),
                fix="download or export the file again and check its size/checksum",
            ) from e
    if suffix in PICKLE_SUFFIXES:
        try:
            with warnings.catch_warnings():  # torch warns about unusual pickle protocols
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            if found is None and not is_pickle(path):   # bytes that are no pickle at all
                raise ModelError("not a readable PyTorch file; it is probably truncated or corrupt", where=str(path),
                                 fix="save or download the file again (torch.save(model.state_dict(), path))") from e
            refs = f" (it references {found.group(1)})" if found else ""
            whole_model = found is not None and found.group(1).startswith("torch.nn.modules")
            raise ModelError(
                f"this pickle would run code when loaded{refs}; lora-cli never unpickles arbitrary "
                "objects" + ("; it looks like a whole pickled model, not a state dict" if whole_model else ""),
                where=str(path),
                fix="ONLY if you trust this file, convert it to safetensors and point the config at the "
                    f"new file:\n    {_convert_snippet(path)}",
            ) from e
        except Exception as e:   # an untrusted file: whatever torch.load fails with, the file is at fault
            detail = (str(e).strip().splitlines() or ["the file ended early" if isinstance(e, EOFError)
                                                      else "no detail"])[0][:200]
            raise ModelError(
                f"not a readable PyTorch file ({type(e).__name__}: {detail}); "
                "it is probably truncated or corrupt",
                where=str(path),
                fix="save or download the file again (torch.save(model.state_dict(), path))",
            ) from e
        return _check_flat_state_dict(obj, path)
    raise ModelError(
        f"unknown weights file type {path.suffix or '(no extension)'!r}",
        where=str(path),
        fix="use a .safetensors file (preferred) or a .pt/.pth/.bin file saved with torch.save(state_dict)",
    )


def first_non_finite(t: torch.Tensor) -> float | None:
    """A NaN or inf value of ``t`` if it holds one (checked in chunks: no full-size mask)."""
    if not t.is_floating_point() and not t.is_complex():
        return None
    flat = t.detach().reshape(-1)
    for chunk in flat.split(1 << 24):
        bad = ~torch.isfinite(chunk)
        if bool(bad.any()):
            return float(chunk[bad][0])
    return None


def check_finite(tensors, where: str) -> None:
    """A ModelError naming the first of ``tensors`` ((name, tensor) pairs) that holds NaN or inf."""
    for name, t in tensors:
        bad = first_non_finite(t)
        if bad is not None:
            raise ModelError(f"the tensor '{name}' holds non-finite values ({bad}): training, evaluating or "
                             "merging with it gives NaN", where=where,
                             fix="use an intact copy of these weights (this one is corrupt or diverged)")


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors in a weights file, read cheaply: a safetensors
    header, or a .pt file memory-mapped (read whole only in the legacy format)."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES and path.is_file():
        return {k: shape for k, (shape, _, _, _) in read_header(path)[0].items()}
    if path.suffix.lower() in PICKLE_SUFFIXES and path.is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return {k: tuple(v.shape) for k, v in _check_flat_state_dict(obj, path).items()}
        except ModelError:
            raise
        except Exception:       # the legacy format cannot be mapped; read_state_dict says what is wrong
            pass
    return {k: tuple(v.shape) for k, v in read_state_dict(path).items()}


def _for_saving(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory with another (safetensors forbids it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in sd.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"a state dict maps str to Tensor; got {key!r}: {type(t).__name__}")
        t = t.detach().cpu()
        storage = t.untyped_storage()
        shared = storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        seen.add(storage.data_ptr())
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
    return out


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write ``sd`` to ``.safetensors`` (or ``.pt``/``.pth``/``.bin``) atomically.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    renamed over ``path``: a crash leaves either the old file or the new one, never half
    of one. ``metadata`` (str -> str) is stored in the safetensors header.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelError(f"unknown weights file type {path.suffix or '(no extension)'!r}", where=str(path),
                         fix="name the file *.safetensors (preferred) or *.pt")
    tensors = _for_saving(sd)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix in SAFETENSORS_SUFFIXES:
            data = safetensors_bytes(tensors, metadata=dict(metadata) if metadata else None)
            write_atomic(path, lambda f: f.write(data))
        else:
            write_atomic(path, lambda f: torch.save(tensors, f))
    except OSError as exc:
        raise write_error(exc, path, "the weights") from None


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}   # a dtype a user names -> torch's
