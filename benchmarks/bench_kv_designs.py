"""Which KV-cache design should the exported graph use? Decode-step time of both on ONNX Runtime (CPU).

    python benchmarks/bench_kv_designs.py [--max-seq 1024 4096] [--intermediate 512] [--vocab 32000] [--threads 2]
                                          [--steps 40] [--rounds 5] [--json PATH]

(a) in-graph update: the graph scatters the step's K/V into the input cache (ScatterElements) and attends
    over the result; the `present` output is bound through IOBinding to the same OrtValue as the input,
    so ORT writes in place.
(b) read-only caches (moetrt's design, `Mixtral.forward`): the graph attends over the cache plus the new
    keys and returns only the new slices [B, KV, 1, D]; the host writes them into the static buffers.

Both graphs are traced from the same Mixtral (mid preset: hidden 1024, 8 layers, 16/4 heads, head_dim 64,
vocab 32000) with the same random weights; TopKMoE runs as the dense reference function, with a small
`--intermediate` so the MoE does not drown the cache cost (it is the same in both designs; so is the
lm_head, which `--vocab` shrinks). Batch 1, the cache half full, medians of interleaved rounds. It also
saves each optimized graph and lists any node that reads a whole cache other than the two attention
MatMuls (a Slice or Transpose there would copy the cache every step).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import Tensor, nn

from moetrt.export.op import onnx_translation, topk_moe
from moetrt.export.reference import with_reference_function
from moetrt.export.trace import input_names, output_names, trace
from moetrt.model.config import PRESETS, MixtralConfig
from moetrt.model.mixtral import Mixtral, apply_rope, rope_tables
from moetrt.model.testing import random_state
from moetrt.plugins import contract


class InGraphCache(nn.Module):
    """Design (a): Mixtral whose graph returns the whole updated caches (scatter) and attends over them."""

    def __init__(self, model: Mixtral):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.config
        x = m.embed_tokens(input_ids)
        cos, sin = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        key_pos = torch.arange(caches[0].shape[2], device=x.device)
        visible = (key_pos[None, None, :] <= position_ids[:, :, None])[:, None, None]  # [B, 1, 1, T, S]
        updated = []
        for layer, k_cache, v_cache in zip(m.layers, caches[0::2], caches[1::2], strict=True):
            att, h = layer.self_attn, layer.input_layernorm(x)
            b, t, _ = h.shape
            d, n_kv, n_rep = att.head_dim, att.n_kv, att.n_heads // att.n_kv
            q = apply_rope(att.q_proj(h).view(b, t, att.n_heads, d).transpose(1, 2), cos, sin)
            k = apply_rope(att.k_proj(h).view(b, t, n_kv, d).transpose(1, 2), cos, sin)
            v = att.v_proj(h).view(b, t, n_kv, d).transpose(1, 2)
            index = position_ids[:, None, :, None].expand(b, n_kv, t, d)
            k_cache, v_cache = k_cache.scatter(2, index, k), v_cache.scatter(2, index, v)
            s = (q.reshape(b, n_kv, n_rep, t, d) @ k_cache.unsqueeze(2).transpose(-1, -2)) / math.sqrt(d)
            p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1, dtype=torch.float32).to(x.dtype)
            out = (p @ v_cache.unsqueeze(2)).reshape(b, att.n_heads, t, d).transpose(1, 2).reshape(b, t, -1)
            x = x + att.o_proj(out)
            x = x + layer.block_sparse_moe(layer.post_attention_layernorm(x))
            updated += [k_cache, v_cache]
        return (m.lm_head(m.norm(x)), *updated)


def present_names(config: MixtralConfig) -> list[str]:
    return [f"present_{kv}.{i}" for i in range(config.num_hidden_layers) for kv in ("key", "value")]


def export_in_graph_cache(config: MixtralConfig, max_seq: int) -> ir.Model:
    """Design (a) traced like `moetrt.export.trace.trace` (meta device, symbolic batch and seq)."""
    contract.register_onnx_schema()
    with torch.device("meta"):
        module = InGraphCache(Mixtral(config, moe_fn=topk_moe)).eval()
        ids, pos = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)
        shape = (2, config.num_key_value_heads, max_seq, config.head_dim)
        caches = [torch.zeros(shape) for _ in range(2 * config.num_hidden_layers)]
    b, t = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (UserWarning, FutureWarning))
        program = torch.onnx.export(
            module,
            (ids, pos, *caches),
            dynamo=True,
            optimize=False,
            dynamic_shapes={"input_ids": {0: b, 1: t}, "position_ids": {0: b, 1: t}, "caches": ({0: b},) * len(caches)},
            input_names=input_names(config),
            output_names=["logits", *present_names(config)],
            custom_translation_table={torch.ops.moetrt.topk_moe.default: onnx_translation},
        )
    for value in list(program.model.graph.initializers.values()):
        value.name = value.name.removeprefix("model.")
    return program.model


def with_weights(model: ir.Model, state: dict[str, Tensor]) -> bytes:
    """Serialized model with `state` as initializers and the reference TopKMoE function attached."""
    for value in model.graph.initializers.values():
        value.const_value = ir.tensor(state[value.name].numpy(), name=value.name)
    return with_reference_function(ir.serde.serialize_model(model)).SerializeToString()


def session(model: bytes, threads: int, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if optimized:
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Decoder:
    """Static caches as OrtValues bound once; `step()` runs one decode token at the next position."""

    def __init__(self, sess: ort.InferenceSession, config: MixtralConfig, max_seq: int, in_graph: bool):
        self.sess, self.in_graph, self.pos = sess, in_graph, max_seq // 2
        shape = (1, config.num_key_value_heads, max_seq, config.head_dim)
        self.caches = {n: np.random.default_rng(0).standard_normal(shape, np.float32) for n in input_names(config)[2:]}
        self.binding = sess.io_binding()
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.caches.items()}  # keep arrays alive
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.logits = np.empty((1, 1, config.vocab_size), np.float32)
        self.outputs = {"logits": ort.OrtValue.ortvalue_from_numpy(self.logits)}
        if in_graph:  # the present output IS the input buffer: ORT updates it in place
            for past, present in zip(input_names(config)[2:], present_names(config), strict=True):
                self.binding.bind_ortvalue_output(present, self.values[past])
        else:
            slice_shape = (1, config.num_key_value_heads, 1, config.head_dim)
            self.new = {n: np.empty(slice_shape, np.float32) for n in output_names(config)[1:]}
            self.outputs.update({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.new.items()})
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def step(self) -> None:
        self.binding.bind_cpu_input("input_ids", np.array([[5]], np.int64))
        self.binding.bind_cpu_input("position_ids", np.array([[self.pos]], np.int64))
        self.sess.run_with_iobinding(self.binding)
        if not self.in_graph:
            # same order: past_key.0, past_value.0, ... and new_key.0, new_value.0, ...
            for cache, new in zip(self.caches.values(), self.new.values(), strict=True):
                cache[:, :, self.pos] = new[:, :, 0]
        self.pos += 1


def whole_cache_readers(optimized: Path, config: MixtralConfig) -> list[str]:
    """Nodes of the optimized graph that read a whole cache other than the attention (Fused)MatMuls: each
    would touch the whole cache every step (a Transpose there is a full copy). Views of a cache (Unsqueeze,
    Reshape, Identity) and the in-graph update (ScatterElements) count as the cache."""
    caches = set(input_names(config)[2:])
    found = []
    for node in onnx.load(optimized, load_external_data=False).graph.node:  # topologically sorted
        if not caches.intersection(node.input):
            continue
        if node.op_type in ("Unsqueeze", "Reshape", "Identity", "ScatterElements") and node.input[0] in caches:
            caches.update(node.output)
        elif node.op_type not in ("MatMul", "FusedMatMul"):
            found.append(node.op_type)
    return sorted(set(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seq", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    config = dataclasses.replace(
        PRESETS["mid"],
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.max_seq),
    )
    state = random_state(config, seed=0, std=0.05)
    rows = []
    for max_seq in args.max_seq:
        graphs = {
            "a: in-graph scatter, aliased IOBinding": (
                with_weights(export_in_graph_cache(config, max_seq), state),
                True,
            ),
            "b: read-only caches + new slices": (with_weights(trace(config, "float32", max_seq), state), False),
        }
        times: dict[str, list[float]] = {name: [] for name in graphs}
        readers = {}
        with tempfile.TemporaryDirectory() as tmp:
            decoders = {}
            for i, (name, (model, in_graph)) in enumerate(graphs.items()):
                optimized = Path(tmp) / f"optimized{i}.onnx"
                decoders[name] = Decoder(session(model, args.threads, optimized), config, max_seq, in_graph)
                readers[name] = whole_cache_readers(optimized, config)
            for _, name in itertools.product(range(args.rounds), graphs):
                decoder = decoders[name]
                decoder.pos = max_seq // 2
                for _ in range(3):
                    decoder.step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    decoder.step()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        cache_mb = 2 * config.num_hidden_layers * config.num_key_value_heads * max_seq * config.head_dim * 4 / 2**20
        for name in graphs:
            rows.append(
                {
                    "design": name,
                    "max_seq": max_seq,
                    "cache_mb": cache_mb,
                    "decode_ms": statistics.median(times[name]),
                    "rounds_ms": times[name],
                    "whole_cache_readers": readers[name],
                }
            )
    print(f"{'design':<40} {'max_seq':>7} {'cache MB':>8} {'decode ms':>9}  other whole-cache readers")
    for r in rows:
        readers = r["whole_cache_readers"] or "none"
        print(f"{r['design']:<40} {r['max_seq']:>7} {r['cache_mb']:>8.0f} {r['decode_ms']:>9.2f}  {readers}")
    if args.json:
        args.json.write_text(json.dumps({"config": config.to_dict(), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
