"""Weights as ONNX external data, streamed from the checkpoint one tensor at a time.

The traced graph's initializers are meta tensors. `place_external` points each at its slot in
`model.onnx.data` (offsets page-aligned so ONNX Runtime can memory-map them), which is all `model.onnx`
needs; `write_weights` then fills the slots from `CheckpointReader`, so peak memory is about the largest
tensor however big the model is, never a second copy of the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir
import torch

from moetrt.artifacts import FileDigest
from moetrt.model.checkpoint import CheckpointReader
from moetrt.model.mixtral import TORCH_DTYPES
from moetrt.names import DATA_FILE

ALIGNMENT = 4096


def place_external(graph: ir.Graph) -> dict[str, tuple[int, int]]:
    """Make every initializer an external tensor in `DATA_FILE`; returns name -> (offset, length)."""
    slots: dict[str, tuple[int, int]] = {}
    end = 0
    for value in graph.initializers.values():
        length = math.prod(value.shape.numpy()) * int(value.dtype.itemsize)
        offset = -(-end // ALIGNMENT) * ALIGNMENT
        value.const_value = ir.ExternalTensor(
            DATA_FILE, offset, length, value.dtype, shape=value.shape, name=value.name
        )
        slots[value.name] = (offset, length)
        end = offset + length
    return slots


def write_weights(
    path: Path,
    reader: CheckpointReader,
    slots: dict[str, tuple[int, int]],
    dtype: str,
    on_tensor: Callable[[str, int], None],
    digest: FileDigest | None = None,
) -> None:
    """Fill `path` with each tensor of `slots`, read from `reader` and cast to `dtype`, at its offset;
    `digest` hashes the bytes as they are written (the manifest's file record)."""
    torch_dtype = TORCH_DTYPES[dtype]
    with open(path, "wb") as fh:
        for name, (offset, length) in slots.items():
            tensor = reader.get(name).to(torch_dtype).contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            if data.nbytes != length:
                raise AssertionError(f"{name}: {data.nbytes} bytes, slot holds {length}")
            fh.seek(offset)
            fh.write(data)
            if digest is not None:
                digest.add(offset, data)
            del tensor, data
            reader.close()  # unmaps the file: pages read so far would otherwise count as resident memory
            on_tensor(name, length)
