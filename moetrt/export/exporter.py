"""`export_checkpoint`: a Hugging Face Mixtral checkpoint -> an export directory.

    model.onnx        the graph (one `moetrt::TopKMoE` node per layer, no local functions)
    model.onnx.data   the weights as external data, in the export dtype
    moetrt.json       the manifest (moetrt.artifacts), kind "export"

The graph is traced on the meta device and the weights are streamed from the checkpoint afterwards, so
exporting Mixtral-8x7B needs about its largest tensor in memory, not the model. Everything is written
into a temporary sibling and renamed into place only after the ONNX checker and strict shape inference
have passed: a failed export leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import onnx
import onnx_ir as ir

from moetrt.artifacts import FileDigest, carry_tokenizer, check_output_dir, file_records, write_manifest
from moetrt.errors import MoetrtError
from moetrt.export.trace import trace
from moetrt.export.weights import place_external, write_weights
from moetrt.fsutil import atomic_dir
from moetrt.model.checkpoint import CheckpointReader, checkpoint_hash
from moetrt.model.config import MixtralConfig, parse_dtype
from moetrt.names import DATA_FILE, MODEL_FILE
from moetrt.plugins import contract
from moetrt.progress import Progress, silent
from moetrt.registry import builds_from
from moetrt.schema import MAX_BATCH


def export_checkpoint(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    max_seq_len: int | None = None,
    max_batch: int = 1,
    dtype: str | None = None,
    progress: Progress | None = None,
    weights: bool = True,
    notice: Callable[[str], None] | None = None,
) -> Path:
    """Export `checkpoint_dir` to `output_dir` and return `output_dir`.

    max_seq_len: the KV caches' length (default: the config's max_position_embeddings).
    max_batch: the largest batch engines are built for (the graph's batch axis is symbolic).
    dtype: float32 | float16 | bfloat16, or fp32 | fp16 | bf16 (default: the config's); logits and caches use
        it too.
    progress: called with (what, bytes done, bytes total) while tracing and writing weights (moetrt.progress).
    weights: False writes the graph and manifest only (no model.onnx.data; needs just config.json) -
        for checking the graph of a model whose weights are not at hand.
    notice: called once, before the long part, with a line saying which engines the export's dtype can be
        built into (`moetrt.registry.builds_from`): a bf16 export cannot become an ONNX Runtime CPU engine.
    """
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    report = progress or silent
    with CheckpointReader(checkpoint_dir) if weights else nullcontext() as reader:
        config = reader.config if reader else MixtralConfig.from_pretrained(checkpoint_dir)
        dtype = parse_dtype(dtype or config.dtype)
        max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
        _check_options(config, max_seq_len, max_batch)
        check_output_dir(output_dir, checkpoint_dir, "checkpoint")
        if notice is not None:
            notice(builds_from(dtype))
        if reader:
            reader.validate()  # from the file headers: fail before the long trace, not after
        with atomic_dir(output_dir) as tmp:
            report(f"tracing {config.num_hidden_layers} layers on the meta device", 0, 0)
            model = trace(config, dtype, max_seq_len)
            slots = place_external(model.graph)
            ir.save(model, tmp / MODEL_FILE)
            digests: dict[str, FileDigest | None] = {MODEL_FILE: None}
            if reader:
                digests[DATA_FILE] = digest = FileDigest(tmp / DATA_FILE)
                total, done = sum(length for _, length in slots.values()), [0]

                def advance(name: str, nbytes: int) -> None:
                    done[0] += nbytes
                    report(f"weights: {name}", done[0], total)

                write_weights(tmp / DATA_FILE, reader, slots, dtype, advance, digest)
                check_model(tmp / MODEL_FILE)
            else:
                with _sparse_placeholder(tmp / DATA_FILE, max(offset + n for offset, n in slots.values())):
                    check_model(tmp / MODEL_FILE)
            body = {
                "config": config.to_dict(),
                "dtype": dtype,
                "max_seq_len": max_seq_len,
                "max_batch": max_batch,
                "io": io_spec(model.graph),
                "parent": checkpoint_hash(checkpoint_dir),
                "weights": weights,
                "files": {"model": MODEL_FILE, "data": DATA_FILE if weights else None},
                "file_records": file_records(tmp, digests),
            }
            write_manifest(tmp, "export", body)
            carry_tokenizer(checkpoint_dir, tmp)
    return output_dir


def _check_options(config: MixtralConfig, max_seq_len: int, max_batch: int) -> None:
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise MoetrtError(f"max_seq_len: expected a positive integer, found {max_seq_len!r}")
    if max_seq_len > config.max_position_embeddings:
        raise MoetrtError(
            f"max_seq_len: {max_seq_len} exceeds the model's max_position_embeddings ({config.max_position_embeddings})"
        )
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH:
        raise MoetrtError(f"max_batch: expected an integer in [1, {MAX_BATCH}], found {max_batch!r}")


@contextmanager
def _sparse_placeholder(path: Path, size: int) -> Iterator[None]:
    """An all-hole data file for the duration of the checks: the checker insists the external data file
    exists, even in memory, and a graph-only export must not ship a file of zero weights."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    try:
        yield
    finally:
        path.unlink()


def check_model(path: Path) -> None:
    """The ONNX checker (path form: it verifies the external data file) and strict shape inference, with
    TopKMoE's schema registered; raise if either fails or the graph carries local functions."""
    contract.register_onnx_schema()
    onnx.checker.check_model(str(path))
    proto = onnx.load(path, load_external_data=False)
    onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    if proto.functions:
        raise AssertionError(f"{path}: the exported graph must not carry local functions")


def io_spec(graph: ir.Graph) -> dict[str, dict[str, dict]]:
    """Graph inputs, outputs and each layer's TopKMoE input/output: name -> {shape, dtype}."""

    def spec(value: ir.Value) -> dict:
        return {"shape": [d if isinstance(d, int) else str(d) for d in value.shape], "dtype": _dtype_name(value)}

    moe = [node for node in graph if (node.domain, node.op_type) == (contract.DOMAIN, contract.OP_TYPE)]
    return {
        "inputs": {v.name: spec(v) for v in graph.inputs},
        "outputs": {v.name: spec(v) for v in graph.outputs},
        "moe": {v.name: spec(v) for node in moe for v in (node.inputs[0], node.outputs[0])},
    }


def _dtype_name(value: ir.Value) -> str:
    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}.get(
        value.dtype, str(value.dtype.numpy())
    )
