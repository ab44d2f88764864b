"""Reader and writer of the IDX files MNIST and Fashion-MNIST are distributed in (optionally gzipped)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
"""IDX type codes → big-endian numpy dtypes (the format's definition)."""
HEADER_BYTES = 4


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` is decompressed), in native byte order."""
    path = Path(path)
    with _open(path) as f:
        raw = f.read()
    if len(raw) < HEADER_BYTES or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file: expected bytes 00 00 <type code in "
                         f"{sorted(hex(c) for c in IDX_DTYPES)}> <ndim>, got {raw[:HEADER_BYTES].hex(' ')}")
    dtype, ndim = IDX_DTYPES[raw[2]], raw[3]
    dims_end = HEADER_BYTES + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[HEADER_BYTES:dims_end], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - dims_end != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} data bytes), file has {len(raw) - dims_end}")
    return np.frombuffer(raw[dims_end:], dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped if ``path`` ends in ``.gz``)."""
    path = Path(path)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    array = np.asarray(array)
    if array.dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; expected one of {sorted(str(d) for d in codes)}")
    code = codes[array.dtype]
    data = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data += array.astype(IDX_DTYPES[code]).tobytes()
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(data)
