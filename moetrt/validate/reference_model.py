"""Make a raw export runnable by plain ONNX Runtime, for `polygraphy run --onnxrt` (docs/validation.md).

    python -m moetrt.validate.reference_model EXPORT_DIR      # writes EXPORT_DIR/model.ref.onnx

ONNX Runtime knows no `moetrt::TopKMoE`, but runs a custom-domain node through a model-local function of
that domain and name. `model.ref.onnx` is the export's graph with the reference function attached (the
contract's semantics in standard ops, moetrt/export/reference.py), referring to the export's own
`model.onnx.data`, so it costs no copy of the weights. It is a separate file because the TensorRT parser
would prefer that function over the plugin: the export's `model.onnx` itself must never carry it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

from moetrt.errors import MoetrtError
from moetrt.export.reference import with_reference_function

REFERENCE_MODEL = "model.ref.onnx"


def write_reference_model(export_dir: str | Path) -> Path:
    """Write `export_dir/model.ref.onnx` (the graph only; weights stay in model.onnx.data) and return its path."""
    source = Path(export_dir) / "model.onnx"
    if not source.is_file():
        raise MoetrtError(f"{source}: not found; expected an export directory (`moetrt export`)")
    model = onnx.load(str(source), load_external_data=False)  # keeps the external-data references as they are
    out = source.with_name(REFERENCE_MODEL)
    tmp = out.with_name(f".{REFERENCE_MODEL}.tmp")
    onnx.save(with_reference_function(model), str(tmp))
    tmp.replace(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m moetrt.validate.reference_model EXPORT_DIR")
    try:
        print(write_reference_model(sys.argv[1]))
    except MoetrtError as err:
        sys.exit(f"error: {err}")
