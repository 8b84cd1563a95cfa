"""Export: a Hugging Face Mixtral checkpoint -> `model.onnx` + `model.onnx.data` + `moetrt.json`.

    export_checkpoint(checkpoint_dir, output_dir, ...)   the entry point (exporter.py)
    moe_input(i), moe_output(i)                          names of layer i's TopKMoE input / output values
    with_reference_function(model_proto)                 attach a standard-op TopKMoE so plain ORT runs it

Modules: op.py (the `moetrt::topk_moe` torch custom op and its ONNX translation), trace.py (meta-device
tracing and naming), weights.py (streamed external data), reference.py (the test-only TopKMoE body).
"""

from moetrt.export.exporter import export_checkpoint
from moetrt.export.reference import with_reference_function
from moetrt.names import moe_input, moe_output

__all__ = ["export_checkpoint", "moe_input", "moe_output", "with_reference_function"]
