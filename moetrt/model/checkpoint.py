"""Hugging Face Mixtral checkpoints: lazy, per-tensor reading and writing in the HF layout.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Two tensor layouts exist and both are read:

- per-expert (what `save_pretrained` writes by default, and every published Mixtral):
  `model.layers.{i}.block_sparse_moe.gate.weight` [E, H] and
  `model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3.weight` [F, H], `.w2.weight` [H, F];
- fused (transformers 5 with `save_original_format=False`): `model.layers.{i}.mlp.gate.weight`,
  `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2F, H] (w1 rows first, then w3) and `down_proj` [E, H, F].

Quantized checkpoints (`quantization_config` in config.json): `quant_method: fp8` is read by dequantizing
each float8 weight at load, a multiply by its scale tensor `<name>_scale` (per-tensor: one value; per-channel:
one per output row, [N] or [N, 1]) or `<name>_scale_inv` (the same multiplier under transformers'
FineGrainedFP8 name; block-wise [ceil(N/bn), ceil(K/bk)] with `weight_block_size` [bn, bk]), in fp32.
Every other method (gptq, awq, bitsandbytes, ...) stores packed integers whose meaning depends on that
library and is refused with one line naming it.

`CheckpointReader` yields moetrt's canonical tensors (see `Mixtral`: HF names without `model.`, experts
stacked as `block_sparse_moe.w1|w3` [E, F, H] and `w2` [E, H, F]) one at a time from memory-mapped
files, so loading or exporting never holds two copies of the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moetrt.errors import MoetrtError
from moetrt.fsutil import atomic_dir, check_regular_file
from moetrt.model.config import MixtralConfig
from moetrt.model.mixtral import TORCH_DTYPES, Mixtral
from moetrt.schema import Strict, first_line, load_json, parse

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_EXPECTED = f"a safetensors shard listed in {INDEX_FILE}"
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("_scale", "_scale_inv")  # the dequantizing multiplier under either name


def quantization(checkpoint_dir: Path) -> dict[str, Any] | None:
    """config.json's `quantization_config` when it describes fp8 weights (None when there is none), or a
    one-line MoetrtError naming a method moetrt cannot read."""
    path = checkpoint_dir / "config.json"
    try:
        raw = json.loads(path.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # MixtralConfig.from_pretrained reports an unreadable config.json
    if raw is None:
        return None
    method = raw.get("quant_method") if isinstance(raw, dict) else None
    if method != "fp8":
        raise MoetrtError(
            f"{path}: quantization_config.quant_method is {method!r}; moetrt reads unquantized checkpoints and "
            "fp8 ones (float8 weights with weight_scale tensors): dequantize this checkpoint first"
        )
    block = raw.get("weight_block_size")
    if block is not None and not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                    for b in block)):  # fmt: skip
        raise MoetrtError(f"{path}: quantization_config.weight_block_size is {block!r}; expected [rows, columns]")
    return raw


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None, name: str) -> torch.Tensor:
    """fp32 weight [..., N, K] = float8 weight times its scale: per-tensor (one value), per-channel ([..., N] or
    [..., N, 1]) or, with `block` [bn, bk], block-wise [..., ceil(N/bn), ceil(K/bk)]."""
    w, scale = weight.float(), scale.float()
    n, k = w.shape[-2:]
    if scale.numel() == 1:
        return w * scale.reshape(())
    lead = tuple(w.shape[:-2])
    if tuple(scale.shape) in (lead + (n,), lead + (n, 1)):
        return w * scale.reshape(*lead, n, 1)
    if block is not None and tuple(scale.shape) == lead + (-(-n // block[0]), -(-k // block[1])):
        full = scale.repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
        return w * full[..., :n, :k]
    raise MoetrtError(
        f"tensor '{name}': scale of shape {list(scale.shape)} fits neither per-tensor, per-channel nor the "
        f"weight_block_size {block} blocks of a {list(w.shape)} weight"
    )


def canonical_shapes(config: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name with its expected shape, in model order."""
    h, f, e, d = config.hidden_size, config.intermediate_size, config.num_local_experts, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "block_sparse_moe.gate.weight": (e, h),
            p + "block_sparse_moe.w1": (e, f, h),
            p + "block_sparse_moe.w3": (e, f, h),
            p + "block_sparse_moe.w2": (e, h, f),
        })  # fmt: skip
    shapes["norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


class CheckpointReader:
    """Lazy access to a checkpoint's tensors under canonical names. Use as a context manager."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
        if not self.dir.is_dir():
            raise MoetrtError(f"{self.dir}: not a directory; expected a Hugging Face checkpoint directory")
        self.config = MixtralConfig.from_pretrained(self.dir)
        self.quantization = quantization(self.dir)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        self._file_of = self._index()
        self.fused = any(".mlp.experts.gate_up_proj" in name for name in self._file_of)

    def _index(self) -> dict[str, str]:
        """Tensor name -> file, from the shard index or the single file; every shard must be a readable
        safetensors file holding the tensors the index maps to it (checked from the headers)."""
        index = read_index(self.dir)
        if index is None:
            file_of = dict.fromkeys(self._handle(SINGLE_FILE).keys(), SINGLE_FILE)
        else:
            file_of = dict(index.weight_map)
            for shard in sorted(set(file_of.values())):
                present = set(self._handle(shard).keys())
                absent = [name for name, file in file_of.items() if file == shard and name not in present]
                if absent:
                    where = f"{self.dir / INDEX_FILE}: field 'weight_map.{absent[0]}'"
                    raise MoetrtError(f"{where} names {shard}, which has no such tensor")
        return file_of

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def _handle(self, file: str):
        if file not in self._handles:
            path = self.dir / file
            check_regular_file(path, "a safetensors file" if file == SINGLE_FILE else SHARD_EXPECTED)
            try:
                self._handles[file] = self._stack.enter_context(safe_open(path, framework="pt"))
            except (SafetensorError, OSError) as err:
                raise MoetrtError(f"{path}: not a readable safetensors file ({first_line(str(err))})") from None
        return self._handles[file]

    def _raw(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise MoetrtError(f"{self.dir}: checkpoint is missing tensor '{name}'")
        file = self._file_of[name]
        try:
            tensor = self._handle(file).get_tensor(name)
        except SafetensorError as err:
            raise MoetrtError(f"{self.dir / file}: cannot read tensor '{name}' ({first_line(str(err))})") from None
        if tensor.dtype not in FLOAT8_DTYPES:
            _check_float(
                self.dir / file, name, str(tensor.dtype).removeprefix("torch."), tensor.dtype.is_floating_point
            )
            return tensor
        if self.quantization is None:
            raise MoetrtError(f"{self.dir / file}: tensor '{name}' is {tensor.dtype} but config.json has no "
                              "quantization_config saying how to dequantize it")  # fmt: skip
        scale = next((name + suffix for suffix in SCALE_SUFFIXES if name + suffix in self._file_of), None)
        if scale is None:
            raise MoetrtError(f"{self.dir}: float8 tensor '{name}' has no '{name}_scale' (or '_scale_inv') tensor")
        scale_tensor = self._handle(self._file_of[scale]).get_tensor(scale)
        return dequantize_fp8(tensor, scale_tensor, self.quantization.get("weight_block_size"), name)

    def _hf(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """One HF tensor, with its shape checked."""
        t = self._raw(name)
        if tuple(t.shape) != shape:
            raise MoetrtError(f"{self.dir}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        return t

    def get(self, name: str) -> torch.Tensor:
        """One canonical tensor (stacking or splitting experts as the layout needs), shape-checked."""
        shape = canonical_shapes(self.config)[name]
        parts = [self._hf(hf_name, hf_shape) for hf_name, hf_shape in self._hf_names(name, shape)]
        part = name.rsplit(".block_sparse_moe.", 1)[-1]
        if part not in ("w1", "w2", "w3"):
            return parts[0]
        if not self.fused:
            return torch.stack(parts)
        if part == "w2":
            return parts[0]
        f = self.config.intermediate_size
        return (parts[0][:, :f] if part == "w1" else parts[0][:, f:]).contiguous()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in canonical_shapes(self.config):
            yield name, self.get(name)

    def validate(self) -> None:
        """Check every tensor's presence and shape from the file headers alone (no data read)."""
        for name, shape in canonical_shapes(self.config).items():
            for hf_name, hf_shape in self._hf_names(name, shape):
                if hf_name not in self._file_of:
                    raise MoetrtError(f"{self.dir}: checkpoint is missing tensor '{hf_name}'")
                header = self._handle(self._file_of[hf_name]).get_slice(hf_name)
                dtype = header.get_dtype()
                _check_float(self.dir / self._file_of[hf_name], hf_name, dtype, dtype.startswith(("F", "BF")))
                found = tuple(header.get_shape())
                if found != hf_shape:
                    raise MoetrtError(
                        f"{self.dir}: tensor '{hf_name}' has shape {list(found)}, expected {list(hf_shape)}"
                    )

    def _hf_names(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        if ".block_sparse_moe." not in name:
            return [(name if name == "lm_head.weight" else "model." + name, shape)]
        layer, part = name.split(".block_sparse_moe.")
        e, f, h = self.config.num_local_experts, self.config.intermediate_size, self.config.hidden_size
        hf = "model." + layer
        if self.fused:
            fused = {
                "gate.weight": ("mlp.gate.weight", shape),
                "w2": ("mlp.experts.down_proj", shape),
                "w1": ("mlp.experts.gate_up_proj", (e, 2 * f, h)),
                "w3": ("mlp.experts.gate_up_proj", (e, 2 * f, h)),
            }
            suffix, s = fused[part]
            return [(f"{hf}.{suffix}", s)]
        if part == "gate.weight":
            return [(f"{hf}.block_sparse_moe.gate.weight", shape)]
        per_expert = (f, h) if part in ("w1", "w3") else (h, f)
        return [(f"{hf}.block_sparse_moe.experts.{j}.{part}.weight", per_expert) for j in range(e)]


def _check_float(file: Path, name: str, dtype: str, floating: bool) -> None:
    """Weights are floating point: an integer tensor would be cast to float silently (a quantized or foreign
    checkpoint, or a damaged header), so it is refused."""
    if not floating:
        raise MoetrtError(f"{file}: tensor '{name}' has dtype {dtype}; expected a floating-point weight")


def load_model(checkpoint_dir: str | Path, dtype: str | None = None, device: str = "cpu") -> Mixtral:
    """Build the eager `Mixtral` from a checkpoint, one tensor at a time (dtype defaults to the config's)."""
    with CheckpointReader(checkpoint_dir) as reader:
        config = reader.config
        torch_dtype = TORCH_DTYPES[dtype or config.dtype]
        with torch.device("meta"):
            model = Mixtral(config)
        state = {}
        for name, tensor in reader.tensors():
            state[name] = tensor.to(device=device, dtype=torch_dtype)
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, assign=True, strict=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def to_hf_tensors(name: str, tensor: torch.Tensor, fused: bool) -> dict[str, torch.Tensor]:
    """Canonical tensor -> HF tensor(s) in the per-expert or fused layout."""
    if ".block_sparse_moe." not in name:
        return {name if name == "lm_head.weight" else "model." + name: tensor}
    layer, part = name.split(".block_sparse_moe.")
    hf = "model." + layer
    if fused:
        return {
            {
                "gate.weight": f"{hf}.mlp.gate.weight",
                "w1": f"{hf}.mlp.experts.gate_up_proj.w1",
                "w3": f"{hf}.mlp.experts.gate_up_proj.w3",
                "w2": f"{hf}.mlp.experts.down_proj",
            }[part]: tensor
        }
    if part == "gate.weight":
        return {f"{hf}.block_sparse_moe.gate.weight": tensor}
    return {f"{hf}.block_sparse_moe.experts.{j}.{part}.weight": tensor[j] for j in range(tensor.shape[0])}


def save_checkpoint(
    state: dict[str, torch.Tensor],
    config: MixtralConfig,
    out_dir: str | Path,
    fused: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write canonical tensors as a Hugging Face checkpoint (sharded past `max_shard_bytes`), atomically."""
    out_dir = Path(out_dir)
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        hf.update(to_hf_tensors(name, tensor.detach().contiguous(), fused))
    if fused:
        for key in [k for k in hf if k.endswith("gate_up_proj.w1")]:
            base = key.removesuffix(".w1")
            hf[base] = torch.cat((hf.pop(key), hf.pop(base + ".w3")), dim=1)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(hf):
        nbytes = hf[key].numel() * hf[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = hf[key].contiguous()
        size += nbytes
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_FILE, metadata={"format": "pt"})
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / file, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in hf.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out_dir


HASH_SAMPLE_BYTES = 4096


def checkpoint_hash(checkpoint_dir: str | Path) -> str:
    """A cheap identity of a checkpoint: sha256 over config.json and, per weight file, its name, size,
    safetensors header (names, dtypes, shapes, offsets) and up to `HASH_SAMPLE_BYTES` bytes at the start,
    middle and end of every tensor's data - not over all the weight bytes, which may be 100 GB. Two
    checkpoints of one architecture with different weights (another seed, a fine-tune) differ in those
    samples; it is an identity for the manifest chain, not an integrity check."""
    d = Path(checkpoint_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    # config.json alone (a graph-only export's source) hashes its config
    has_weights = os.path.lexists(d / INDEX_FILE) or os.path.lexists(d / SINGLE_FILE)
    for file in weight_files(d) if has_weights else []:
        path = d / file
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(header_len, 100_000_000))
            h.update(file.encode())
            h.update(str(path.stat().st_size).encode())
            h.update(header)
            try:
                entries = json.loads(header)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a corrupt file: its header bytes are hashed, reading it fails with its own error
            for name in sorted(k for k in entries if k != "__metadata__"):
                start, end = entries[name].get("data_offsets", (0, 0))
                for offset in sorted({start, (start + end) // 2, max(start, end - HASH_SAMPLE_BYTES)}):
                    fh.seek(8 + header_len + offset)
                    h.update(fh.read(max(0, min(HASH_SAMPLE_BYTES, end - offset))))
    return h.hexdigest()


class ShardIndex(Strict):
    """`model.safetensors.index.json`: tensor name -> shard file name (a file in the checkpoint directory)."""

    metadata: dict[str, Any] | None = None
    weight_map: dict[str, Annotated[str, Field(pattern=r"^[^/\\]+\.safetensors$")]]


def read_index(checkpoint_dir: Path) -> ShardIndex | None:
    """The checkpoint's shard index, None when it has a single `model.safetensors`, or a MoetrtError."""
    index_path = checkpoint_dir / INDEX_FILE
    if os.path.lexists(index_path):
        check_regular_file(index_path, "a shard index")
        return parse(ShardIndex, load_json(index_path, "a shard index"), str(index_path))
    if not os.path.lexists(checkpoint_dir / SINGLE_FILE):
        raise MoetrtError(f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE}; expected safetensors weights")
    return None


def weight_files(checkpoint_dir: Path) -> list[str]:
    """The safetensors files a checkpoint's weights are read from (sorted), each checked to be a file."""
    index = read_index(checkpoint_dir)
    files = [SINGLE_FILE] if index is None else sorted(set(index.weight_map.values()))
    for file in files:
        check_regular_file(checkpoint_dir / file, SHARD_EXPECTED if index else "a safetensors file")
    return files
