"""The deep-compression file (``.dc``, Han et al. 2016): shared weights stored as Huffman-coded
cluster indices and Huffman-coded gaps between the weights pruning kept, everything else as
float16; decoded back to a plain state dict.

Layout::

    MAGIC, uint32 header length, zlib(JSON header), payload

The header holds the caller's metadata (a student file's, as a dict) and one entry per tensor,
in state-dict order: ``dense`` ones (float16 or int64 bytes in the payload) and ``shared`` ones
(a float32 codebook, then the two Huffman streams: cluster index of each kept weight, and the
number of pruned weights before it, in row-major order). The codes are canonical, so the header
keeps only each stream's code-length counts and symbols (bitarray's ``canonical_huffman``: a
maintained C implementation, whose decoder is ~100x a Python bit loop's speed).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bitarray import bitarray
from bitarray.util import canonical_decode, canonical_huffman

MAGIC = b"DISTILL-DC\x00\x01"
GAP_BITS = 8  # the paper's fixed-width relative index (conv layers), for the uncoded stages' sizes


@dataclass
class Shared:
    """A weight tensor as deep compression keeps it: ``codebook[index]``, 0 where ``index`` is -1."""

    codebook: torch.Tensor  # (K,) float32 centroids
    index: torch.Tensor  # int64, the weight's shape: a cluster in 0..K-1, or -1 (pruned)

    def tensor(self) -> torch.Tensor:
        """The float32 weights this stands for."""
        flat = self.index.flatten()
        values = torch.where(flat >= 0, self.codebook[flat.clamp_min(0)], torch.zeros((), dtype=torch.float32))
        return values.view(self.index.shape)


def stored_dense(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor the file keeps as is, as it will read back: floats through float16."""
    return tensor.half().float() if tensor.is_floating_point() else tensor


# -- writing ---------------------------------------------------------------------------------


def encode(state: dict[str, torch.Tensor], shared: dict[str, Shared], meta: dict) -> bytes:
    """The file's bytes: ``shared`` tensors as codes, the rest of ``state`` as float16/int64."""
    payload = bytearray()
    entries = []
    for name, tensor in state.items():
        entry = {"name": name, "shape": list(tensor.shape)}
        if name in shared:
            entry.update(_encode_shared(shared[name], payload))
        else:
            t = tensor.detach().cpu().contiguous()
            array = t.half().numpy() if t.is_floating_point() else t.long().numpy()
            entry.update(kind="f16" if t.is_floating_point() else "i64", offset=len(payload), nbytes=array.nbytes)
            payload += array.tobytes()
        entries.append(entry)
    header = zlib.compress(json.dumps({"meta": meta, "tensors": entries}).encode("utf-8"), 9)
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(payload)


def _encode_shared(s: Shared, payload: bytearray) -> dict:
    flat = s.index.flatten().numpy()
    kept = np.flatnonzero(flat >= 0)
    gaps = np.diff(kept, prepend=-1) - 1  # pruned weights before each kept one
    entry = {"kind": "shared", "k": int(s.codebook.numel()), "kept": int(kept.size),
             "codebook_offset": len(payload)}
    payload += s.codebook.float().numpy().astype("<f4").tobytes()
    entry["index"] = _huffman(flat[kept], payload)
    entry["gaps"] = _huffman(gaps, payload)
    return entry


def _huffman(symbols: np.ndarray, payload: bytearray) -> dict:
    """Append the canonical Huffman code of ``symbols`` to ``payload``; the entry that decodes it."""
    values, counts = np.unique(symbols, return_counts=True)
    if len(values) <= 1:  # one symbol (or none): nothing to code
        return {"constant": int(values[0]) if len(values) else 0}
    code, count, order = canonical_huffman(dict(zip(values.tolist(), counts.tolist())))
    bits = bitarray(endian="big")
    bits.encode(code, symbols.tolist())
    entry = {"count": list(count), "symbol": [int(x) for x in order], "offset": len(payload), "nbits": len(bits)}
    payload += bits.tobytes()
    return entry


def write(path: str | Path, state: dict[str, torch.Tensor], shared: dict[str, Shared], meta: dict) -> int:
    """Write the file (to a temporary name, then renamed: a crash leaves no half file); its size."""
    path = Path(path)
    data = encode(state, shared, meta)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


# -- reading ---------------------------------------------------------------------------------


def is_compressed(path: str | Path) -> bool:
    """Whether ``path`` is a file of this format (by its first bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(float32 state dict, metadata) of a ``.dc`` file; ValueError, in one line, if it is not one."""
    return decode(Path(path).read_bytes(), str(path))


def decode(data: bytes, origin: str = "the file") -> tuple[dict[str, torch.Tensor], dict]:
    if not data.startswith(MAGIC):
        raise ValueError(f"{origin} is not a distill compressed student (no {MAGIC[:10].decode()} header)")
    try:
        (size,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(zlib.decompress(data[start:start + size]))
        payload = memoryview(data)[start + size:]
        state = {e["name"]: _decode_tensor(e, payload) for e in header["tensors"]}
    except (struct.error, zlib.error, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise ValueError(f"{origin} is damaged or truncated ({type(e).__name__}): compress the student again") from None
    return state, header["meta"]


def _decode_tensor(entry: dict, payload: memoryview) -> torch.Tensor:
    shape = entry["shape"]
    if entry["kind"] in ("f16", "i64"):
        dtype = "<f2" if entry["kind"] == "f16" else "<i8"
        raw = payload[entry["offset"]:entry["offset"] + entry["nbytes"]]
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        if array.nbytes != entry["nbytes"]:
            raise ValueError("short tensor")
        return torch.from_numpy(array.astype(np.float32 if entry["kind"] == "f16" else np.int64))
    k, kept = entry["k"], entry["kept"]
    codebook = np.frombuffer(payload[entry["codebook_offset"]:entry["codebook_offset"] + 4 * k], dtype="<f4")
    index = _unhuffman(entry["index"], kept, payload)
    gaps = _unhuffman(entry["gaps"], kept, payload)
    positions = np.cumsum(gaps + 1) - 1
    flat = np.full(int(np.prod(shape)), -1, dtype=np.int64)
    flat[positions] = index  # IndexError on a damaged stream
    if index.size and (index.min() < 0 or index.max() >= k):
        raise ValueError("cluster index out of range")
    return Shared(torch.from_numpy(codebook.copy()), torch.from_numpy(flat).view(shape)).tensor()


def _unhuffman(entry: dict, n: int, payload: memoryview) -> np.ndarray:
    if "constant" in entry:
        return np.full(n, entry["constant"], dtype=np.int64)
    bits = bitarray(endian="big")
    bits.frombytes(bytes(payload[entry["offset"]:entry["offset"] + (entry["nbits"] + 7) // 8]))
    if len(bits) < entry["nbits"]:
        raise ValueError("short code stream")
    del bits[entry["nbits"]:]
    symbols = np.fromiter(canonical_decode(bits, entry["count"], entry["symbol"]), dtype=np.int64)
    if symbols.size != n:
        raise ValueError(f"{symbols.size} symbols where {n} were written")
    return symbols


# -- sizes of the stages before coding (the paper's table) ------------------------------------


def stage_bytes(state: dict[str, torch.Tensor], shared: dict[str, Shared], bits: int | None) -> int:
    """Bytes of ``state`` stored uncoded: each kept weight of a ``shared`` tensor at 32 bits
    (``bits=None``: pruned only) or ``bits`` bits plus the codebook, with a fixed-width
    GAP_BITS relative position when the tensor was pruned (and a filler entry for each longer
    gap, as in the paper), the other tensors at float16."""
    total_bits = 0
    for name, tensor in state.items():
        if name not in shared:
            total_bits += tensor.numel() * (16 if tensor.is_floating_point() else 64)
            continue
        s = shared[name]
        kept = np.flatnonzero(s.index.flatten().numpy() >= 0)
        gaps = np.diff(kept, prepend=-1) - 1
        if kept.size == s.index.numel():  # nothing pruned: no positions to store
            entries, gap_bits = kept.size, 0
        else:
            entries, gap_bits = kept.size + int((gaps // (2**GAP_BITS)).sum()), GAP_BITS  # fillers for long gaps
        total_bits += entries * ((32 if bits is None else bits) + gap_bits)
        if bits is not None:
            total_bits += 32 * s.codebook.numel()
    return (total_bits + 7) // 8
