"""Reader for the IDX file format used by the MNIST distribution.

The format (http://yann.lecun.com/exdb/mnist/, "FILE FORMATS FOR THE MNIST DATABASE") is::

    magic   : 4 bytes, big-endian. Bytes 0-1 are zero, byte 2 is the element type code,
              byte 3 the number of dimensions. MNIST images are 0x00000803 (uint8, 3 dims),
              labels 0x00000801 (uint8, 1 dim).
    dims    : one big-endian uint32 per dimension.
    payload : prod(dims) elements, row-major, big-endian.

Files may be gzip-compressed (as distributed) or plain; the gzip magic bytes decide, not the
file name, so a gunzipped copy named ``*.gz`` (or the reverse) still reads correctly.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# Element type code (third magic byte) -> big-endian numpy dtype, per the IDX specification.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str | os.PathLike) -> bytes:
    """Returns the (decompressed) contents of ``path``.

    Args:
      path: An IDX file, gzip-compressed or not.

    Returns:
      The raw IDX bytes.

    Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: If the file looks gzip-compressed but cannot be decompressed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:  # Truncated or corrupt download.
            raise ValueError(f"{path}: corrupt gzip stream ({e})") from e
    return data


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Parses an IDX file into a numpy array.

    Args:
      path: Path to the IDX file (gzip-compressed or plain).
      expected_magic: If given, the 32-bit magic number the file must carry, e.g.
        ``IMAGES_MAGIC`` (0x803) or ``LABELS_MAGIC`` (0x801).

    Returns:
      An array of shape ``dims`` in native byte order (``uint8`` for MNIST files).

    Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: On a bad or unexpected magic number, a truncated header, or a payload
        whose size does not match the header dimensions.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    zero, type_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{magic:08x} (not an IDX file?)")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(f"{path}: truncated IDX header, {ndim} dimensions declared")
    dims = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected_size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual_size = len(data) - header_size
    if actual_size != expected_size:
        raise ValueError(
            f"{path}: IDX size mismatch, header dims {dims} need {expected_size} payload bytes "
            f"but the file has {actual_size}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(dims)
    # Native byte order so downstream code (and tfds feature encoding) sees ordinary dtypes.
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx_images(path: str | os.PathLike) -> np.ndarray:
    """Reads an MNIST-style image file (magic 0x803).

    Args:
      path: Path to e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
      ``uint8`` array of shape ``(N, H, W)``.

    Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: On a bad magic number or a size mismatch.
    """
    return read_idx(path, expected_magic=IMAGES_MAGIC)


def read_idx_labels(path: str | os.PathLike) -> np.ndarray:
    """Reads an MNIST-style label file (magic 0x801).

    Args:
      path: Path to e.g. ``train-labels-idx1-ubyte.gz``.

    Returns:
      ``uint8`` array of shape ``(N,)``.

    Raises:
      FileNotFoundError: If ``path`` does not exist.
      ValueError: On a bad magic number or a size mismatch.
    """
    return read_idx(path, expected_magic=LABELS_MAGIC)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool = True) -> None:
    """Writes ``array`` as an IDX file; the inverse of :func:`read_idx`.

    Used by the tests to create tiny MNIST-format files, and handy for making fixtures.

    Args:
      path: Destination file.
      array: Array with at least one dimension and one of the IDX element types.
      compress: Whether to gzip the output (as the MNIST distribution does).
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes or array.ndim == 0:
        raise ValueError(f"cannot write dtype {array.dtype} / ndim {array.ndim} as IDX")
    code = codes[native]
    header = struct.pack(">I", (code << 8) | array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    data = header + payload
    if compress:
        # mtime=0 keeps the bytes reproducible across runs.
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
