"""Trace the Mixtral graph on the meta device: structure only, no weight is ever allocated.

The result is an onnx_ir model whose names are the contract other stages rely on:
graph I/O as in `moetrt.names` (input_ids, position_ids, past_key.{i}, past_value.{i} ->
logits, new_key.{i}, new_value.{i}), each TopKMoE node's input and output named `layers.{i}.moe_input` /
`layers.{i}.moe_output` (the validation suite marks them as outputs to compare layer by layer), each
attention's boundary named `layers.{i}.attn_input` (what q/k/v_proj read) / `layers.{i}.attn_output` (what
o_proj reads; engines replace what lies between by their own attention kernel), and initializers named like
the canonical checkpoint tensors (`layers.0.self_attn.q_proj.weight`, ...).
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir
import torch
from torch import Tensor, nn

from moetrt import names
from moetrt.export.op import onnx_translation, topk_moe
from moetrt.model.config import MixtralConfig
from moetrt.model.mixtral import TORCH_DTYPES, Mixtral
from moetrt.names import attn_input, attn_output, moe_input, moe_output
from moetrt.plugins import contract

OPSET = 20
BATCH, SEQ = "batch", "seq"


def input_names(config: MixtralConfig) -> list[str]:
    caches = ((names.past_key(i), names.past_value(i)) for i in range(config.num_hidden_layers))
    return [names.INPUT_IDS, names.POSITION_IDS, *itertools.chain.from_iterable(caches)]


def output_names(config: MixtralConfig) -> list[str]:
    new = ((names.new_key(i), names.new_value(i)) for i in range(config.num_hidden_layers))
    return [names.LOGITS, *itertools.chain.from_iterable(new)]


class _FlatIO(nn.Module):
    """Mixtral with flat graph I/O in `input_names` / `output_names` order (caches interleaved per layer)."""

    def __init__(self, model: Mixtral):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        logits, new_k, new_v = self.model(input_ids, position_ids, caches[0::2], caches[1::2])
        return (logits, *itertools.chain.from_iterable(zip(new_k, new_v, strict=True)))


def trace(config: MixtralConfig, dtype: str, max_seq_len: int) -> ir.Model:
    """The exported graph with meta-device initializers (replace them before saving).

    Batch and sequence length are symbolic (`batch`, `seq`); the caches' sequence axis is `max_seq_len`.
    """
    contract.register_onnx_schema()
    torch_dtype = TORCH_DTYPES[dtype]
    with torch.device("meta"):
        module = _FlatIO(Mixtral(config, moe_fn=topk_moe).to(torch_dtype)).eval()
        batch, seq = 2, 3  # > 1 so that torch.export does not specialise either dimension
        ids, positions = torch.zeros(batch, seq, dtype=torch.long), torch.zeros(batch, seq, dtype=torch.long)
        cache_shape = (batch, config.num_key_value_heads, max_seq_len, config.head_dim)
        caches = [torch.zeros(cache_shape, dtype=torch_dtype) for _ in range(2 * config.num_hidden_layers)]
    b, t = torch.export.Dim(BATCH), torch.export.Dim(SEQ)
    dynamic_shapes = {"input_ids": {0: b, 1: t}, "position_ids": {0: b, 1: t}, "caches": ({0: b},) * len(caches)}
    with _quiet_and_fast():
        program = torch.onnx.export(
            module,
            (ids, positions, *caches),  # distinct tensors: torch.export merges aliased inputs
            dynamo=True,
            optimize=False,  # optimize=True renames initializers and fails on the meta device
            opset_version=OPSET,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names(config),
            output_names=output_names(config),
            custom_translation_table={torch.ops.moetrt.topk_moe.default: onnx_translation},
            verbose=False,
        )
    model = program.model
    _rename(model.graph, config)
    return model


@contextmanager
def _quiet_and_fast() -> Iterator[None]:
    """The settings of the trace.

    - Silence torch.export's warnings about dim names and the ONNX registry's "torchvision is not installed.
      Skipping torchvision::nms" lines (logged at WARNING once per torchvision op on every export).
    - Turn off FakeTensor's dispatch cache: with symbolic batch/seq dims, rebuilding each cached output costs
      more sympy work than running the meta kernel (tiny preset: 17.5 s -> 11.7 s CPU per export; most of
      the trace is symbolic-shape arithmetic in torch.export and its decomposition re-trace).
    """
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
            warnings.simplefilter("ignore", (UserWarning, FutureWarning))
            yield
    finally:
        registry_log.setLevel(level)


def _rename(graph: ir.Graph, config: MixtralConfig) -> None:
    """Initializers get their checkpoint names; each MoE node's I/O and each attention's boundary (the
    activation input of the q_proj and o_proj MatMuls) get their layer's names."""
    for value in list(graph.initializers.values()):
        value.name = value.name.removeprefix("model.")
        if config.tie_word_embeddings and value.name == "lm_head.weight":
            value.name = "embed_tokens.weight"  # torch.export keeps the tied parameter's last name
    boundaries = {"q_proj": attn_input, "o_proj": attn_output}
    for node in graph:
        if (node.domain, node.op_type) == (contract.DOMAIN, contract.OP_TYPE):
            layer = int(node.inputs[1].name.split(".")[1])  # layers.{i}.block_sparse_moe.gate.weight
            node.inputs[0].name = moe_input(layer)
            node.outputs[0].name = moe_output(layer)
        elif (node.domain, node.op_type) == ("", "MatMul"):
            weight = _weight_name(graph, node.inputs[1])  # layers.{i}.self_attn.{proj}.weight
            parts = weight.split(".") if weight else []
            if len(parts) == 5 and parts[2] == "self_attn" and parts[3] in boundaries:
                node.inputs[0].name = boundaries[parts[3]](int(parts[1]))


def _weight_name(graph: ir.Graph, value: ir.Value | None) -> str | None:
    """The initializer behind a MatMul's weight operand (optimize=False traces every Linear as Transpose(W))."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose":
        value = producer.inputs[0]
    return value.name if value is not None and value.name in graph.initializers else None
