"""Peer: ONNX Runtime GenAI (`onnxruntime-genai`, CPU), built from the same Hugging Face checkpoint.

ORT GenAI's model builder has no Mixtral entry, but Mixtral is its Mistral decoder with the MLP replaced
by a top-k MoE, and the builder's base class already knows how to emit `com.microsoft::MoE` / `QMoE` for
fused-expert checkpoints (`make_interleaved_swiglu_moe_preprocessing`, used by its Qwen3.5-MoE builder).
`MixtralBuilder` (in `_mixtral_builder_class`) supplies the three Mixtral-specific hooks (where the MoE
module is, the router, the MoE node) and `build_ortgenai_model` runs the builder's own `create_model`
with it; everything else (attention as GroupQueryAttention, RMSNorm fusion, MatMulNBits quantization,
genai_config.json) is the builder's own code, so the peer is what an ORT GenAI user would get.

Precisions: fp32 (MoE), int8 (MatMulNBits 8-bit + QMoE int8), int4 (MatMulNBits 4-bit + QMoE int4,
then `accuracy_level=4` set on the QMoE nodes: the builder omits it, and without it int4 decode was
3.0x slower on the mid preset). The router MatMul stays fp32 in every precision (a
quantized router flips expert choices; llama.cpp keeps it f32 too).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.peers.common import peak_rss_bytes, random_prompt, timing_fields

PRECISIONS = ("fp32", "int8", "int4")


def _mixtral_builder_class() -> type:
    """The builder subclass, defined lazily so importing this module does not import onnxruntime_genai."""
    from onnxruntime_genai.models.builders.mistral import MistralModel

    class MixtralBuilder(MistralModel):
        """ORT GenAI Mistral builder + a Mixtral sparse-MoE block (transformers 5 fused-expert layout)."""

        def __init__(
            self, config: Any, io_dtype: Any, onnx_dtype: Any, ep: str, cache_dir: str, extra_options: dict
        ) -> None:
            super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
            # Mixtral: softmax over router logits, top-k, renormalise the k weights, SwiGLU experts
            # (silu(x W1) * (x W3)) W2; the MoE op takes W1/W3 interleaved row-wise (swiglu_fusion=1).
            self.moe_attrs["activation_type"] = "swiglu"
            self.moe_attrs["swiglu_fusion"] = 1
            self.moe_attrs["normalize_routing_weights"] = True
            self.moe_intermediate_size = config.intermediate_size

        def get_moe_module(self, layer_id: int, layer: Any) -> Any:
            return layer.mlp  # MixtralSparseMoeBlock: .gate (router, weight [E, H]) and .experts (fused)

        def make_moe_preprocessing(self, layer_id: int, moe: Any, root_input: str) -> None:
            self.make_interleaved_swiglu_moe_preprocessing(layer_id, moe)

        def make_moe_router(self, layer_id: int, moe: Any, root_input: str) -> None:
            basename = f"/model/layers.{layer_id}/moe/router/MatMul"
            self.exclude_node_from_quantization(basename)
            matmul = self.make_matmul(moe.gate, basename, root_input)
            self.make_reshape(
                f"/model/layers.{layer_id}/moe/router/Reshape",
                [f"{matmul}/output_0", f"/model/constants/INT64/{[-1, self.moe_attrs['num_experts']]}"],
                dtype=self.io_dtype,
                shape=self.make_moe_router_shape(),
            )

        def make_moe_subgraph(self, layer_id: int, moe: Any, root_input: str) -> None:
            op_type = self.moe_attrs["op_type"]
            names = self.make_moe_expert_names(layer_id)
            name = f"/model/layers.{layer_id}/moe/{op_type}"
            quantized = op_type == "QMoE"
            self.make_moe_op(
                name,
                root_input=root_input,
                router_probs=f"/model/layers.{layer_id}/moe/router/Reshape/output_0",
                weight1=names["gate_up_weight"],
                scales1=names["gate_up_scales"] if quantized else "",
                bias1=names["gate_up_bias"],
                weight2=names["down_weight"],
                scales2=names["down_scales"] if quantized else "",
                bias2=names["down_bias"],
            )
            self.layernorm_attrs["skip_input"] = f"{name}/output_0"

    return MixtralBuilder


def set_qmoe_accuracy_level(model_path: str | Path, level: int = 4) -> int:
    """Set `accuracy_level` on every com.microsoft QMoE node of `model_path` (graph only; the external
    weight file is untouched). Returns the number of nodes changed."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type == "QMoE" and node.domain == "com.microsoft":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", level)])
            changed += 1
    onnx.save(model, str(model_path))
    return changed


def build_ortgenai_model(
    checkpoint_dir: str | Path, out_dir: str | Path, precision: str = "fp32", quiet: bool = True
) -> Path:
    """Build an ORT GenAI CPU model folder (model.onnx, model.onnx.data, genai_config.json, tokenizer)
    from a Hugging Face Mixtral checkpoint with the builder's own pipeline and `MixtralBuilder`.

    The builder dispatches on `config.architectures[0]`; Mixtral is not in its table, so the loaded
    config is relabelled MistralForCausalLM and the builder's Mistral class is swapped for the Mixtral
    subclass for the duration of the call (restored afterwards)."""
    from onnxruntime_genai.models import builder

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint_dir, out_dir = str(Path(checkpoint_dir).resolve()), Path(out_dir)
    cache_dir = str(out_dir / ".cache")
    options = {"int8": ["moe_quant_type=int8"], "int4": ["moe_quant_type=int4"]}.get(precision, [])
    if quiet:  # the builder prints per tensor and ORT's quantizer logs per node at INFO
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    sink = io.StringIO()
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        extra = builder.parse_extra_options(None, checkpoint_dir, str(out_dir), precision, "cpu", cache_dir, options)
        hf_config = extra["hf_details"]["hf_config"]
        if hf_config.architectures[0] != "MixtralForCausalLM":
            raise ValueError(f"{checkpoint_dir}: expected MixtralForCausalLM, found {hf_config.architectures}")
        hf_config.architectures = ["MistralForCausalLM"]
        saved = builder.MistralModel
        builder.MistralModel = _mixtral_builder_class()
        try:
            builder.create_model(None, checkpoint_dir, str(out_dir), precision, "cpu", cache_dir, **extra)
        except Exception:
            sys.__stderr__.write(sink.getvalue()[-4000:])  # the builder's own account of what it was doing
            raise
        finally:
            builder.MistralModel = saved
    if precision == "int4" and set_qmoe_accuracy_level(out_dir / "model.onnx", 4) == 0:
        raise RuntimeError(f"{out_dir}/model.onnx: no QMoE node to set accuracy_level on")
    return out_dir


def build_for_runner(checkpoint_dir: str, out_dir: str, precision: str) -> dict[str, Any]:
    """`build_ortgenai_model` with a JSON-serialisable result, for `common.run_isolated`."""
    t0 = time.perf_counter()
    build_ortgenai_model(checkpoint_dir, out_dir, precision)
    return {"out_dir": out_dir, "build_s": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}


def moe_op_summary(model_dir: str | Path) -> dict[str, Any]:
    """Counts of MoE-relevant node types in the built graph (to check the build did what it says)."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    counts: dict[str, int] = {}
    levels = set()
    for node in model.graph.node:
        if node.op_type in ("MoE", "QMoE", "MatMulNBits", "MatMul", "GroupQueryAttention"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        if node.op_type == "QMoE":
            levels.update(a.i for a in node.attribute if a.name == "accuracy_level")
    return {"op_counts": counts, "qmoe_accuracy_levels": sorted(levels)}


def load_ortgenai_model(model_dir: str | Path, threads: int) -> Any:
    """`og.Model` with the decoder session pinned to `threads` intra-op threads (and 1 inter-op)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return og.Model(config)


def ortgenai_generate(
    model: Any, prompt: Any, new_tokens: int, max_length: int | None = None
) -> tuple[float, list[float], list[list[int]]]:
    """Greedy generation of exactly `new_tokens` tokens (min_length = prompt + new tokens, so EOS cannot end a
    run early; the loop stops after `new_tokens`). max_length (default prompt + new tokens) sizes ORT GenAI's
    shared KV buffer, its engine's capacity. Returns (start time, per-token host timestamps, ids
    [batch][new_tokens]).

    `append_tokens` runs the prompt; each `generate_next_token` picks a token from the current logits
    and (after the first) runs one decode step first, so token 0's stamp is the time to first token."""
    import numpy as np
    import onnxruntime_genai as og

    batch, prompt_len = prompt.shape
    params = og.GeneratorParams(model)
    total = prompt_len + new_tokens
    params.set_search_options(do_sample=False, max_length=max(total, max_length or 0), min_length=total,
                              batch_size=batch)  # fmt: skip
    generator = og.Generator(model, params)
    ids = np.ascontiguousarray(prompt, dtype=np.int32)
    times: list[float] = []
    steps: list[Any] = []
    t0 = time.perf_counter()
    generator.append_tokens(ids)
    for _ in range(new_tokens):
        generator.generate_next_token()
        steps.append(np.array(generator.get_next_tokens(), copy=True))
        times.append(time.perf_counter())
    tokens = np.stack(steps, axis=1) if steps else np.zeros((batch, 0), np.int64)
    del generator
    return t0, times, tokens.tolist()


def bench_ortgenai(
    model_dir: str,
    prompt_len: int = 128,
    new_tokens: int = 128,
    batch: int = 1,
    threads: int = 2,
    seed: int = 0,
    warmup_tokens: int = 16,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Benchmark an ORT GenAI model folder: a warmup generation (same prompt, `warmup_tokens` new
    tokens), then one timed greedy run; same prompt, warmup and fields as `hf.bench_hf`. Run it in its
    own process (`common.run_isolated`) for `peak_rss_bytes`."""
    import onnxruntime
    import onnxruntime_genai as og

    t_load = time.perf_counter()
    model = load_ortgenai_model(model_dir, threads)
    load_s = time.perf_counter() - t_load
    genai_cfg = json.loads((Path(model_dir) / "genai_config.json").read_text())
    prompt = random_prompt(genai_cfg["model"]["vocab_size"], batch, prompt_len, seed)
    if warmup_tokens:
        ortgenai_generate(model, prompt, max(2, min(warmup_tokens, new_tokens)), max_length)
    t0, times, tokens = ortgenai_generate(model, prompt, new_tokens, max_length)
    wall_s = times[-1] - t0
    summary = moe_op_summary(model_dir)
    precision = "int4" if 4 in _weight_bits(model_dir) else "int8" if 8 in _weight_bits(model_dir) else "fp32"
    return {
        "backend": f"ortgenai-{precision}",
        "precision": precision,
        **timing_fields(t0, times, batch),
        "wall_s": wall_s,
        "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
        "token_ids": tokens,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch": batch,
        "threads": threads,
        **summary,
        "onnxruntime_version": onnxruntime.__version__,
        "onnxruntime_genai_version": og.__version__,
    }


def _weight_bits(model_dir: str | Path) -> set[int]:
    """The expert weight bit widths of the graph's QMoE nodes (empty for an fp32 MoE graph)."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "QMoE" for a in n.attribute if a.name == "expert_weight_bits"}
