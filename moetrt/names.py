"""Names every stage shares: the graph's I/O, the per-layer values validation and routing read, and the files
of an artifact directory. The ground floor of the house: it imports nothing of moetrt's.

Graph I/O (shapes in the export manifest's `io`; symbolic dims "batch" and "seq"):
    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             past_key.{i}, past_value.{i} [batch, kv_heads, max_seq, head_dim]   (read-only in the export)
    outputs  logits [batch, seq, vocab], new_key.{i}, new_value.{i} [batch, kv_heads, seq, head_dim]
An ORT engine's graph (attention lowered to GroupQueryAttention) instead outputs
             present_key.{i}, present_value.{i} [batch, kv_heads, max_seq, head_dim]: the caches with the step's
             K/V written at its positions; a runtime binds them to the same buffers as past_key/past_value.
Per-layer values (graph values an engine can be asked to return for validation or routing statistics):
    layers.{i}.moe_input [tokens, hidden]       the TopKMoE node's input (after the post-attention norm)
    layers.{i}.moe_output [tokens, hidden]      its output
    layers.{i}.router_logits [tokens, experts]  the router's logits (fp32 at every precision)
    layers.{i}.expert_ids [tokens, top_k] int64     the selected experts, best first (the contract's routing)
    layers.{i}.expert_weights [tokens, top_k] fp32  their routing weights (renormalised when the node says so)
An engine computes expert_ids / expert_weights only when they are requested: the ORT lowering puts the
contract's routing in the graph as the model-local function ROUTE_FUNCTION (domain, name), which a loader
calls on `router_logits` for the layers asked for; an uncalled function costs nothing.
Attention boundary (named by the exporter; an engine replaces what lies between by its attention kernel):
    layers.{i}.attn_input [batch, seq, hidden]  the normed hidden state the q/k/v projections read
    layers.{i}.attn_output [batch, seq, heads * head_dim]  attention's output, before o_proj
"""

from __future__ import annotations

# --- graph I/O ---------------------------------------------------------------------------------------------
INPUT_IDS = "input_ids"
POSITION_IDS = "position_ids"
LOGITS = "logits"
KV_LIVE = "kv_live"  # TensorRT engines: input [L] whose length is the cache slots a step reads (trt_attention)


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def new_key(layer: int) -> str:
    return f"new_key.{layer}"


def new_value(layer: int) -> str:
    return f"new_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


# --- per-layer values --------------------------------------------------------------------------------------
def moe_input(layer: int) -> str:
    return f"layers.{layer}.moe_input"


def moe_output(layer: int) -> str:
    return f"layers.{layer}.moe_output"


def router_logits(layer: int) -> str:
    return f"layers.{layer}.router_logits"


def expert_ids(layer: int) -> str:
    return f"layers.{layer}.expert_ids"


def expert_weights(layer: int) -> str:
    return f"layers.{layer}.expert_weights"


ROUTE_FUNCTION = ("moetrt.routing", "Route")  # router_logits [T, E] -> expert_ids, expert_weights [T, k]


def attn_input(layer: int) -> str:
    return f"layers.{layer}.attn_input"


def attn_output(layer: int) -> str:
    return f"layers.{layer}.attn_output"


def layer_prefix(layer: int) -> str:
    """`layers.{i}`: the prefix of every value and initializer of layer i."""
    return f"layers.{layer}"


# --- artifact files ----------------------------------------------------------------------------------------
MANIFEST = "moetrt.json"  # every artifact directory's manifest (moetrt.artifacts)
MODEL_FILE = "model.onnx"  # exports and ORT engines
DATA_FILE = "model.onnx.data"  # their external weights
ENGINE_FILE = "model.engine"  # a serialized TensorRT engine
TOKENIZER = "tokenizer.json"  # the checkpoint's tokenizer (Hugging Face `tokenizers`), carried into every artifact
SENTENCEPIECE_MODEL = "tokenizer.model"  # the sentencepiece model it was converted from (Llama/Mistral checkpoints)
TOKENIZER_CONFIG = "tokenizer_config.json"  # BOS/EOS adding, special tokens, chat_template (transformers' names)
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # bos_token, eos_token, ... where tokenizer_config.json lacks them
CHAT_TEMPLATE = "chat_template.jinja"  # the chat template as its own file (transformers >= 4.43 writes it)
GENERATION_CONFIG = "generation_config.json"  # stop ids and sampling defaults (transformers' GenerationConfig)
# What an artifact carries from its source so that it turns text into ids and back on its own.
TEXT_FILES = (TOKENIZER, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, CHAT_TEMPLATE, GENERATION_CONFIG)


def layer_of(value_name: str) -> int:
    """The layer index of a per-layer value or initializer name (`layers.{i}.…` -> i); ValueError otherwise."""
    head, index, _ = value_name.split(".", 2) if value_name.count(".") >= 2 else ("", "", "")
    if head != "layers" or not index.isdigit():
        raise ValueError(f"{value_name!r} is not a per-layer name (layers.<i>.<value>)")
    return int(index)
