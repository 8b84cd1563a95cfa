"""Build an ONNX Runtime engine directory from a moetrt export.

    export dir (model.onnx, model.onnx.data, moetrt.json)
      -> every moetrt::TopKMoE lowered to a router MatMul + com.microsoft::MoE / QMoE (ort_lowering.py)
      -> every layer's attention lowered to a packed QKV MatMul + com.microsoft::GroupQueryAttention over
         caches shared between past and present (ort_attention.py)
      -> residual Add + RMSNorm fused into com.microsoft::SkipSimplifiedLayerNormalization (ort_norm.py)
      -> weight Transposes folded into transposed initializers (ort_fold.py)
      -> int8 / int4: the attention and lm_head MatMuls as MatMulNBits (ort_linear.py)
      -> engine dir (model.onnx, model.onnx.data, moetrt.json with kind "engine", backend "ort")

The export's weights are memory-mapped and the engine's are written tensor by tensor (new MoE weights are
computed as they are written), so a 90 GB model is converted with memory for about its largest tensor.
The directory appears atomically: a failed build leaves no engine behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx_ir as ir

from moetrt import names
from moetrt.artifacts import (
    FileDigest,
    carry_tokenizer,
    check_output_dir,
    file_records,
    lineage,
    manifest_config,
    read_manifest,
    write_manifest,
)
from moetrt.devices import providers
from moetrt.engines.ort_attention import lower_attention
from moetrt.engines.ort_fold import fold_weight_transposes
from moetrt.engines.ort_linear import quantize_linear_weights
from moetrt.engines.ort_lowering import PRECISIONS, lower_topk_moe, moe_slices, router_matmul
from moetrt.engines.ort_norm import fuse_skip_rms_norm
from moetrt.errors import MoetrtError
from moetrt.fsutil import atomic_dir
from moetrt.names import DATA_FILE, MODEL_FILE
from moetrt.progress import Progress, silent
from moetrt.schema import MAX_THREADS


def build_ort_engine(
    export_dir: str | Path,
    output_dir: str | Path,
    precision: str = "fp32",
    threads: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Lower the export in `export_dir` for ONNX Runtime and write the engine directory `output_dir`.

    precision: "fp32": experts unquantized in the export's float dtype (com.microsoft::MoE); "int8" / "int4":
        QMoE experts and MatMulNBits attention / lm_head, block-32 weights (routers and embeddings stay float).
    threads: intra-op threads the engine is served with (None: ORT's default); fp32 experts are sliced for
        that many threads (ort_lowering.moe_slices; None: one slice per CPU).
    device: "cpu" (None) or "cuda" (needs onnxruntime-gpu; the same graph).
    progress: called with (what, bytes written, bytes total) while the weights are written (moetrt.progress).
    Returns the engine directory.
    """
    export_dir, output_dir = Path(export_dir), Path(output_dir)
    device = device or "cpu"
    if precision not in PRECISIONS:
        raise MoetrtError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if threads is not None and not (isinstance(threads, int) and 1 <= threads <= MAX_THREADS):
        raise MoetrtError(f"threads: expected an integer in [1, {MAX_THREADS}], found {threads!r}")
    providers(device)  # refuse a device this onnxruntime cannot serve before doing any work
    check_output_dir(output_dir, export_dir, "export")
    export_manifest = read_manifest(export_dir, "export")
    config = manifest_config(export_manifest)
    if device == "cpu" and export_manifest["dtype"] == "bfloat16":
        raise MoetrtError(
            f"{export_dir}: a bfloat16 export; ONNX Runtime's CPU kernels run float32 or float16, re-export with "
            "dtype float32"
        )
    if not export_manifest.get("weights", True):
        raise MoetrtError(f"{export_dir}: a graph-only export (no weights); re-export with weights to build an engine")
    model = _load_graph(export_dir / MODEL_FILE)
    spec = PRECISIONS[precision]
    slices = moe_slices(threads or os.cpu_count() or 1, config.intermediate_size) if spec is None else 1
    layers = lower_topk_moe(model, precision, slices)
    if not layers:
        raise MoetrtError(f"{export_dir / MODEL_FILE}: no moetrt::TopKMoE node; expected a graph from `moetrt export`")
    try:
        lower_attention(model, config, int(export_manifest["max_seq_len"]))
    except MoetrtError as err:
        raise MoetrtError(f"{export_dir / MODEL_FILE}: {err}") from None
    skip_norms = fuse_skip_rms_norm(model)
    fold_weight_transposes(model)
    quantized = [] if spec is None else quantize_linear_weights(model, spec, keep={router_matmul(p) for p in layers})
    with atomic_dir(output_dir) as tmp:
        data = FileDigest(tmp / DATA_FILE)
        _save(model, tmp / MODEL_FILE, progress or silent, data)
        io = dict(export_manifest["io"])
        io["outputs"] = _engine_outputs(io, config)
        io["router_logits"] = {
            names.router_logits(layer): {"shape": [_tokens(io, layer), config.num_local_experts], "dtype": "float32"}
            for layer in layers
        }
        k = config.num_experts_per_tok
        io["routing"] = {  # made on request (ort_lowering.route_function); costs nothing otherwise
            name: {"shape": [_tokens(io, layer), k], "dtype": dtype}
            for layer in layers
            for name, dtype in ((names.expert_ids(layer), "int64"), (names.expert_weights(layer), "float32"))
        }
        body = {
            "backend": "ort",
            "precision": precision,
            "quantization": None if spec is None else {**vars(spec), "matmuls": quantized},
            "threads": threads,
            "device": device,
            "onnxruntime_version": _ort_version(),
            "moe_layers": layers,
            "attention": "GroupQueryAttention",
            "skip_norms": skip_norms,
            "moe_slices": slices,
            "config": export_manifest["config"],
            "dtype": export_manifest["dtype"],
            "max_seq_len": export_manifest["max_seq_len"],
            "max_batch": export_manifest["max_batch"],
            "io": io,
            **lineage(export_dir, export_manifest),
            "file_records": file_records(tmp, {MODEL_FILE: None, DATA_FILE: data}),
        }
        write_manifest(tmp, "engine", body)
        carry_tokenizer(export_dir, tmp)
    return output_dir


def _load_graph(path: Path) -> ir.Model:
    """The graph with its weights left on disk (external tensors are memory-mapped when read)."""
    if not path.is_file():
        raise MoetrtError(f"{path}: not found; expected the exported ONNX graph")
    try:
        return ir.load(path)
    except Exception as err:  # protobuf DecodeError and friends: a truncated or foreign file
        raise MoetrtError(f"{path}: not a readable ONNX model ({type(err).__name__}: {err})") from None


def _save(model: ir.Model, path: Path, progress: Progress, digest: FileDigest) -> None:
    """Write the graph and stream its weights into model.onnx.data, one tensor at a time, hashing each
    tensor's bytes into `digest` as they are written (the manifest's file record)."""
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    done = [0]

    def on_tensor(tensor: ir.TensorProtocol, _info: Any) -> None:
        # Called before each tensor is materialized and written: the bytes before it are done.
        progress(f"writing {tensor.name}", done[0], total)
        done[0] += tensor.nbytes

    for value in model.graph.initializers.values():
        if value.const_value is not None and value.const_value.nbytes > _INLINE_BYTES:
            value.const_value = _Hashed(value.const_value, digest)
    ir.save(model, path, external_data=DATA_FILE, size_threshold_bytes=_INLINE_BYTES, callback=on_tensor)
    progress("weights written", total, total)


def _engine_outputs(io: dict[str, Any], config) -> dict[str, Any]:
    """The export's outputs with each layer's new_key/new_value replaced by present_key/present_value, the
    whole cache [batch, kv_heads, max_seq_len, head_dim] (ort_attention.py)."""
    outputs = {}
    for name, spec in io["outputs"].items():
        for i in range(config.num_hidden_layers):
            for new, present, past in ((names.new_key(i), names.present_key(i), names.past_key(i)),
                                       (names.new_value(i), names.present_value(i), names.past_value(i))):  # fmt: skip
                if name == new:
                    name, spec = present, io["inputs"][past]
        outputs[name] = spec
    return outputs


_INLINE_BYTES = 256  # onnx_ir's default: smaller tensors stay inside model.onnx


class _Hashed:
    """A tensor whose bytes go through `digest` on their way to the external data file: onnx_ir's writer
    seeks to the tensor's offset and calls `tofile`, so the digest sees every byte exactly as written."""

    def __init__(self, tensor: ir.TensorProtocol, digest: FileDigest):
        self._tensor, self._digest = tensor, digest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensor, name)

    def tofile(self, file: Any) -> None:
        data = self._tensor.tobytes()
        self._digest.add(file.tell(), data)
        file.write(data)


def _tokens(io: dict[str, Any], layer: int) -> int | str:
    """The token axis of a layer's MoE input as the export recorded it (symbolic: a string)."""
    entry = io.get("moe", {}).get(names.moe_input(layer))
    return entry["shape"][0] if entry else "tokens"


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
