"""The five checks, each a small function from recorded outputs to a `CheckResult`.

Array agreement is decided by Polygraphy's `SimpleCompareFunc` (through `Comparator.compare_accuracy`)
with `check_error_stat="max"` and, per output, an absolute tolerance of `rel * max |eager|` over the run:
errors are judged against the scale of what is compared, which differs by orders of magnitude between
logits, a layer's MoE output and a KV cache. The checks add what a max-error cannot say: top-k agreement,
which layer diverged first, whether a routing flip sat on a near-tie, where greedy decoding diverged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
from polygraphy.comparator.struct import IterationResult
from polygraphy.logger import G_LOGGER

from moetrt import names as io
from moetrt.model.mixtral import Mixtral, rank_experts, sparse_moe
from moetrt.names import moe_input, moe_output, router_logits
from moetrt.validate.inputs import Feed
from moetrt.validate.runners import to_numpy
from moetrt.validate.tolerances import Tolerance

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Error:
    """One output's agreement over a run: max |engine - eager| against `rel_tolerance * scale`, over `compared`
    values. Nothing compared (every token left out) is not a pass: `passed` is then False."""

    max_abs: float
    scale: float  # max |eager| over the run
    rel_tolerance: float
    passed: bool
    compared: int = 0  # how many values were compared

    @property
    def rel(self) -> float:
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else math.inf

    def to_dict(self) -> dict[str, float | bool | None]:
        """JSON-ready: an infinite error (a missing output, a shape mismatch) becomes null."""
        finite = {"max_abs": self.max_abs, "scale": self.scale, "rel": self.rel}
        return {k: v if math.isfinite(v) else None for k, v in finite.items()} | {
            "rel_tolerance": self.rel_tolerance,
            "passed": self.passed,
            "compared": self.compared,
        }


@dataclass
class CheckResult:
    """One check's verdict, the figures behind it and, for per-layer checks, the first failing layer."""

    name: str
    passed: bool
    summary: str  # one line a person can act on
    tolerance: dict[str, float]
    figures: dict[str, Any] = field(default_factory=dict)
    layer: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "summary": self.summary, "first_failing_layer": self.layer,
                "tolerance": self.tolerance, "figures": self.figures}  # fmt: skip


def compare(run_results: RunResults, names: Sequence[str], rel_tolerance: Callable[[str], float]) -> dict[str, Error]:
    """Compare the outputs `names` of a two-runner RunResults (eager first) with Polygraphy, over all iterations.

    An iteration without a name (`run_results` drops empty arrays) compares nothing for it; a name compared in
    no iteration at all gets a failing Error with `compared` 0."""
    (_, reference), _ = run_results.items()
    scale = {name: max((float(np.abs(it[name]).max()) for it in reference if name in it), default=0.0)
             for name in names}  # fmt: skip
    atol = {name: rel_tolerance(name) * scale[name] for name in names}
    func = SimpleCompareFunc(
        check_shapes=True,
        atol=atol,
        rtol=0.0,  # with the "max" statistic a pass then means exactly: max |diff| <= atol
        check_error_stat="max",
        find_output_func=lambda name, _index, result: [name] if name in names and name in result else [],
    )
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(run_results, compare_func=func)
    (iterations,) = accuracy[0].values()
    errors = {}
    for name in names:
        present = [it[name] for it in reference if name in it]
        results = [it[name] for it in iterations if name in it]
        compared = sum(a.size for a in present)
        if not present:
            errors[name] = Error(0.0, 0.0, rel_tolerance(name), False, 0)
        elif len(results) != len(present):  # missing from the engine's outputs
            errors[name] = Error(math.inf, scale[name], rel_tolerance(name), False, compared)
        else:
            # A shape mismatch comes back as a bare False instead of an OutputCompareResult.
            max_abs = max(getattr(r, "max_absdiff", math.inf) for r in results)
            errors[name] = Error(max_abs, scale[name], rel_tolerance(name), all(bool(r) for r in results), compared)
    return errors


def run_results(reference: Sequence[Outputs], engine: Sequence[Outputs], names: tuple[str, str]) -> RunResults:
    """Wrap recorded outputs (one dict per iteration) as Polygraphy RunResults, to `compare` them.

    Arrays are made contiguous: Polygraphy's comparison views them, and masked or transposed slices are not.
    An output whose eager array is empty (every token of it left out) is dropped from both sides of that
    iteration: Polygraphy would average an empty slice.
    """
    results = RunResults()
    for runner, outputs in zip(names, (reference, engine), strict=True):
        iterations = [{name: np.ascontiguousarray(a) for name, a in it.items() if eager.get(name, a).size}
                      for it, eager in zip(outputs, reference, strict=True)]  # fmt: skip
        results.append((runner, [IterationResult(it, runner_name=runner) for it in iterations]))
    return results


def check_logits(error: Error, reference: np.ndarray, engine: np.ndarray, excluded: int, tol: Tolerance) -> CheckResult:
    """Logits of every feed (prefill and the decode step): scaled max error, top-1 and top-5 agreement.

    `reference` / `engine` [N, vocab] hold the real tokens that no near-tie routing flip touched (`excluded`
    counts the others): after such a flip both sides are right and a token's logits may differ by O(1).
    """
    tolerance = {"rel": tol.logits_rel, "top1": tol.top1, "top5": tol.top5}
    figures: dict[str, Any] = {**error.to_dict(), "tokens": len(reference), "excluded_tokens": excluded}
    if not len(reference):  # nothing left to judge is not a pass
        summary = f"no token left to compare: all {excluded} were left out after near-tie routing flips"
        return CheckResult("logits", False, summary, tolerance, figures | {"top1": None, "top5": None})
    top1 = float(np.mean(reference.argmax(-1) == engine.argmax(-1)))
    ref5, eng5 = np.argsort(-reference, axis=-1)[:, :5], np.argsort(-engine, axis=-1)[:, :5]
    top5 = float(np.mean((ref5[:, :, None] == eng5[:, None, :]).any(-1).sum(-1) / 5))
    passed = error.passed and top1 >= tol.top1 and top5 >= tol.top5
    summary = f"max abs {error.max_abs:.3g} (rel {error.rel:.2g}); top-1 {top1:.1%}, top-5 {top5:.1%}"
    summary += f" of {len(reference)} tokens" + (
        f" ({excluded} after near-tie routing flips left out)" if excluded else ""
    )
    return CheckResult("logits", passed, summary, tolerance, figures | {"top1": top1, "top5": top5})


LAYER_VALUES = (  # a layer's values in computation order, with what a first failure there points at
    ("new_key", "attention K/V (projections or RoPE)"),
    ("new_value", "attention K/V (projections or RoPE)"),
    ("moe_input", "attention output or residual stream"),
    ("moe_block", "the MoE block itself, on the engine's own input"),
    ("moe_output", "error accumulated upstream (the MoE block alone agrees)"),
)


def layer_value(layer: int, value: str) -> str:
    """The output name of one of `LAYER_VALUES` (new_key.{i} and new_value.{i} are graph outputs)."""
    return f"{value}.{layer}" if value.startswith("new_") else f"layers.{layer}.{value}"


def moe_block(layer: int) -> str:
    return layer_value(layer, "moe_block")


def moe_block_outputs(
    model: Mixtral, engine: Sequence[Outputs], feeds: Sequence[Feed], tie_margin: float
) -> tuple[list[Outputs], list[Outputs]]:
    """Per iteration, the reference MoE (`sparse_moe`) on the engine's own MoE inputs and the engine's MoE
    outputs, under `moe_block(i)`, for the real tokens where both select the same experts or the reference's
    routing is not within `tie_margin` of a tie.

    This isolates each block's error from what earlier layers accumulated, so a quantized engine still
    localises a bad layer. On a near-tie either expert set is right and the outputs differ by O(1); exact
    ties are compared (the contract's rule decides them, and the engine must follow it).
    """
    dtype = model.embed_tokens.weight.dtype
    top_k = model.config.num_experts_per_tok
    reference, ours = [], []
    with torch.inference_mode():
        for it, feed in zip(engine, feeds, strict=True):
            ref_it, eng_it = {}, {}
            for i, layer in enumerate(model.layers):
                block = layer.block_sparse_moe
                x = torch.from_numpy(np.ascontiguousarray(it[moe_input(i)])).to(dtype)
                sets, margin = expert_sets(to_numpy(x @ block.gate.weight.t()), top_k)
                engine_sets, _ = expert_sets(engine_router_logits(model, it, i), top_k)
                same = (sets == engine_sets).all(-1)
                keep = (same | (margin > tie_margin)) & feed.real.reshape(-1)
                y = sparse_moe(x, block.gate.weight, block.w1, block.w3, block.w2, block.top_k)
                ref_it[moe_block(i)] = to_numpy(y)[keep]
                eng_it[moe_block(i)] = it[moe_output(i)][keep]
            reference.append(ref_it)
            ours.append(eng_it)
    return reference, ours


def check_layers(errors: dict[str, Error], num_layers: int, tol: Tolerance) -> CheckResult:
    """Per layer, end to end against eager: new K/V, MoE input and output; and the MoE block alone.

    `errors` holds every name of `LAYER_VALUES` for every layer. The first failing value in layer and
    computation order names the layer and, through `LAYER_VALUES`, the part of it to look at. A value with
    nothing left to compare (every token contaminated by earlier near-tie routing flips) is not judged and
    is named in the summary; nothing judged at all fails.
    """
    figures: dict[str, Any] = {}
    first = None
    names = [layer_value(i, value) for i in range(num_layers) for value, _ in LAYER_VALUES]
    judged = [name for name in names if errors[name].compared]
    for i in range(num_layers):
        figures[str(i)] = {value: errors[layer_value(i, value)].to_dict() for value, _ in LAYER_VALUES}
        if first is None:
            first = next(((i, v, hint) for v, hint in LAYER_VALUES
                          if layer_value(i, v) in judged and not errors[layer_value(i, v)].passed), None)  # fmt: skip
    tolerance = {"state_rel": tol.state_rel, "moe_rel": tol.moe_rel}
    skipped = [name for name in names if name not in judged]
    note = f"; not judged (nothing left after near-tie flips): {', '.join(skipped)}" if skipped else ""
    if not judged:
        return CheckResult("layers", False, "no layer value left to compare" + note, tolerance, figures, 0)
    if first is None:
        worst = max(judged, key=lambda name: errors[name].rel / errors[name].rel_tolerance)
        summary = f"{num_layers} layers agree (closest to tolerance: {worst} rel {errors[worst].rel:.2g})"
        return CheckResult("layers", True, summary + note, tolerance, figures)
    layer, value, hint = first
    error = errors[layer_value(layer, value)]
    summary = (
        f"first diverging layer {layer}: {layer_value(layer, value)} rel {error.rel:.2g} > {error.rel_tolerance:g}"
        f" - look at {hint}"
    )
    return CheckResult("layers", False, summary, tolerance, figures, layer)


def expert_sets(logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The contract's routing of each row (`moetrt.model.mixtral.rank_experts`): the selected expert sets
    [N, k] (sorted by index) and eager's margin p_k - p_(k+1) (0 on an exact tie at the k-th place)."""
    ordered, order = rank_experts(torch.from_numpy(np.asarray(logits, dtype=np.float32)))
    sets = torch.sort(order[:, :top_k], dim=-1).values.numpy()
    if top_k == ordered.shape[-1]:
        return sets, np.full(len(sets), np.inf, dtype=np.float32)
    return sets, (ordered[:, top_k - 1] - ordered[:, top_k]).numpy()


def engine_router_logits(model: Mixtral, outputs: Outputs, layer: int) -> np.ndarray:
    """The engine's router logits: its own output when it has one (ORT), else recomputed from its MoE input
    with the checkpoint's router weight (an engine whose router is fused away, e.g. a TensorRT plugin)."""
    if router_logits(layer) in outputs:
        return outputs[router_logits(layer)]
    gate = model.layers[layer].block_sparse_moe.gate.weight
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(outputs[moe_input(layer)])).to(gate.dtype)
        return to_numpy(x @ gate.t())


@dataclass(frozen=True)
class Routing:
    """One layer's routing on every token row of every iteration: does the engine select eager's expert set,
    and eager's margin p_k - p_(k+1) (how close eager itself was to another set)."""

    same: list[np.ndarray]  # per iteration, bool [tokens]
    margin: list[np.ndarray]  # per iteration, float [tokens]

    def tie_flips(self, tie_margin: float) -> list[np.ndarray]:
        """Per iteration, the tokens routed differently where eager was within `tie_margin` of doing so too."""
        return [~same & (margin <= tie_margin) for same, margin in zip(self.same, self.margin, strict=True)]


def routings(model: Mixtral, reference: Sequence[Outputs], engine: Sequence[Outputs]) -> list[Routing]:
    top_k = model.config.num_experts_per_tok
    layers = []
    for i in range(model.config.num_hidden_layers):
        same, margins = [], []
        for ref_it, eng_it in zip(reference, engine, strict=True):
            ref_sets, margin = expert_sets(ref_it[router_logits(i)], top_k)
            # The engine's selection as the contract makes it from the engine's own logits (exact ties to the
            # higher index, which ONNX Runtime's MoE/QMoE follow); an engine that breaks ties otherwise shows up
            # in the MoE outputs (layers check), not here.
            eng_sets, _ = expert_sets(engine_router_logits(model, eng_it, i), top_k)
            same.append((ref_sets == eng_sets).all(-1))
            margins.append(margin)
        layers.append(Routing(same, margins))
    return layers


@dataclass(frozen=True)
class Contamination:
    """Per layer and feed, the tokens [batch, seq] whose values may differ by O(1) although both sides are
    right, because some token's routing flipped on a near-tie (where either expert set is correct):
        at_kv      the token's own residual is off (its new K/V at this layer);
        at_input   attention mixed an off token into it (causally along its row): its MoE input;
        at_output  at_input, or its own routing flipped on a near-tie here: its MoE output.
    Later tokens of the row are contaminated through attention; the decode feed's rows only by themselves
    (their caches come from eager).
    """

    at_kv: list[list[np.ndarray]]
    at_input: list[list[np.ndarray]]
    at_output: list[list[np.ndarray]]

    @classmethod
    def from_routing(cls, layers: Sequence[Routing], feeds: Sequence[Feed], tie_margin: float) -> Contamination:
        own = [np.zeros(f.real.shape, dtype=bool) for f in feeds]
        at_kv, at_input, at_output = [], [], []
        for routing in layers:
            mixed = [np.logical_or.accumulate(m, axis=1) for m in own]
            ties = [t.reshape(m.shape) for t, m in zip(routing.tie_flips(tie_margin), own, strict=True)]
            at_kv.append(own)
            at_input.append(mixed)
            own = [m | t for m, t in zip(mixed, ties, strict=True)]
            at_output.append(own)
        return cls(at_kv, at_input, at_output)


def check_routing(
    layers: Sequence[Routing], feeds: Sequence[Feed], tainted: Contamination, tol: Tolerance
) -> CheckResult:
    """Per layer: the fraction of real tokens whose selected expert SET is eager's. A flip where eager's
    margin p_k - p_(k+1) is within `tie_margin` is expected noise; flips on a clear margin must stay under
    `clear_flips` (zero at fp32/fp16/bf16: a wrong router or routing input shows up exactly here). Tokens
    whose MoE input an earlier near-tie flip contaminated are not judged (counted as `contaminated`)."""
    figures: dict[str, Any] = {}
    first = None
    for i, routing in enumerate(layers):
        judged = np.concatenate([(f.real & ~m).reshape(-1) for f, m in zip(feeds, tainted.at_input[i], strict=True)])
        flipped = ~np.concatenate(routing.same)[judged]
        margin = np.concatenate(routing.margin)[judged]
        clear = flipped & (margin > tol.tie_margin)
        tokens = len(flipped)
        figures[str(i)] = {
            "tokens": tokens,
            "contaminated": int(sum((f.real & m).sum() for f, m in zip(feeds, tainted.at_input[i], strict=True))),
            "matched": float(1 - flipped.mean()) if tokens else None,
            "near_tie_flips": int((flipped & ~clear).sum()),
            "clear_flips": int(clear.sum()),
            "exact_ties": int((margin == 0).sum()),
            "largest_flipped_margin": float(margin[flipped].max()) if flipped.any() else None,
        }
        if first is None and tokens and clear.sum() > tol.clear_flips * tokens:
            first = i
    tolerance = {"tie_margin": tol.tie_margin, "clear_flips": tol.clear_flips}
    exact = sum(f["exact_ties"] for f in figures.values())
    ties_note = (
        f"; {exact} tokens with exact ties at the k-th expert (broken to the higher index, as the op contract "
        "says; transformers' torch.topk may choose other experts there)"
        if exact
        else ""
    )
    skipped = [layer for layer, f in figures.items() if not f["tokens"]]
    if skipped:  # every token of these layers followed a near-tie flip
        ties_note += f"; layers {', '.join(skipped)} not judged (no token left after near-tie flips)"
    if len(skipped) == len(figures):
        return CheckResult("routing", False, "no token left to judge in any layer" + ties_note, tolerance, figures, 0)
    if first is None:
        matched = min(f["matched"] for f in figures.values() if f["tokens"])
        ties = sum(f["near_tie_flips"] for f in figures.values())
        clear = sum(f["clear_flips"] for f in figures.values())
        summary = f"expert sets match on >= {matched:.1%} of tokens in every layer judged"
        summary += f"; flips: {ties} on near-ties, {clear} on clear margins" if ties + clear else ""
        return CheckResult("routing", True, summary + ties_note, tolerance, figures)
    f = figures[str(first)]
    summary = (
        f"layer {first}: {f['clear_flips']} of {f['tokens']} tokens route to another expert set on a clear "
        f"margin (up to {f['largest_flipped_margin']:.3g} > tie margin {tol.tie_margin:g})"
    )
    return CheckResult("routing", False, summary + ties_note, tolerance, figures, first)


def keep_tokens(name: str, value: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The rows of one output for the tokens `keep` [batch, seq] selects, whatever the output's layout:
    logits [B, T, V], new K/V [B, KV, T, D], per-layer values [B*T, H]."""
    if name.startswith(("new_key.", "new_value.")):
        return value.transpose(0, 2, 1, 3)[keep]
    if name == io.LOGITS:
        return value[keep]
    return value[keep.reshape(-1)]


@dataclass(frozen=True)
class Divergence:
    """Where one row's greedy tokens first differ, and whether eager itself nearly chose the engine's token."""

    row: str
    steps: int
    first: int | None  # the first differing step, None when every step agrees
    margin: float | None  # there, eager's logit margin between its token and the engine's / max |logits|
    near_tie: bool  # that margin is within `token_tie`: the engine's logits error can explain the swap

    @property
    def agreement(self) -> float:
        return 1.0 if self.first is None else self.first / self.steps


def divergence(
    label: str, ref_tokens: list[int], eng_tokens: list[int], ref_logits: Sequence[np.ndarray], tol: Tolerance
) -> Divergence:
    """Compare one row's greedy tokens; `ref_logits[step]` are eager's logits that chose its token there.

    A divergence is a near-tie when eager's margin between its token and the engine's is at most
    `token_tie * max |logits|` there: the engine's logits error may swap two such tokens."""
    steps = len(ref_tokens)
    first = next((s for s in range(steps) if ref_tokens[s] != eng_tokens[s]), None)
    if first is None:
        return Divergence(label, steps, None, None, False)
    logits = ref_logits[first]
    margin = float((logits[ref_tokens[first]] - logits[eng_tokens[first]]) / (np.abs(logits).max() or 1.0))
    return Divergence(label, steps, first, margin, margin <= tol.token_tie)


def check_greedy(rows: Sequence[Divergence], tol: Tolerance) -> CheckResult:
    """Greedy decoding through `generate` on both backends: identical tokens, or a row diverges only on a
    near-tie or after agreeing on at least `greedy_prefix` of the steps."""
    failing = [d for d in rows if d.first is not None and not d.near_tie and d.agreement < tol.greedy_prefix]
    figures = {"rows": [{"prompt": d.row, "steps": d.steps, "first_divergence": d.first, "agreement": d.agreement,
                         "margin": d.margin, "near_tie": d.near_tie} for d in rows]}  # fmt: skip
    identical = sum(d.first is None for d in rows)
    figures.update(identical_rows=identical, min_agreement=min(d.agreement for d in rows))
    tolerance = {"token_tie": tol.token_tie, "greedy_prefix": tol.greedy_prefix}
    if not failing:
        summary = f"{identical} of {len(rows)} rows token-identical over {rows[0].steps} steps"
        diverged = [d for d in rows if d.first is not None]
        if diverged:
            ties = sum(d.near_tie for d in diverged)
            summary += (f"; {ties} diverge on a near-tie of eager's logits (margin <= {tol.token_tie:g}), "
                        f"{len(diverged) - ties} after >= {tol.greedy_prefix:.0%} of the steps")  # fmt: skip
        return CheckResult("greedy", True, summary, tolerance, figures)
    d = failing[0]
    summary = (f"{d.row}: first divergence at step {d.first} of {d.steps} on a clear margin "
               f"({d.agreement:.0%} agreement < {tol.greedy_prefix:.0%}); {len(failing)} row(s) fail")  # fmt: skip
    return CheckResult("greedy", False, summary, tolerance, figures)


def kv_cache_name(layer: int, part: str) -> str:
    return f"layers.{layer}.{part}_cache"


def check_kv_cache(errors: dict[str, Error], num_layers: int, positions: int, tol: Tolerance) -> CheckResult:
    """The backends' KV caches after decoding, at the positions both wrote from identical tokens (per row:
    the prompt and the decode steps before its first divergence); a layer fails on either K or V. A layer
    with no such position left (each row's first token followed a near-tie routing flip) is not judged and
    is named; no layer judged fails."""
    figures: dict[str, Any] = {"positions": positions}
    for i in range(num_layers):
        figures[str(i)] = {part: errors[kv_cache_name(i, part)].to_dict() for part in ("k", "v")}
    tolerance = {"kv_rel": tol.kv_rel}
    judged = [i for i in range(num_layers) if all(errors[kv_cache_name(i, part)].compared for part in ("k", "v"))]
    skipped = [str(i) for i in range(num_layers) if i not in judged]
    note = f"; layers {', '.join(skipped)} not judged (no position left after near-tie flips)" if skipped else ""
    if not judged:
        return CheckResult("kv_cache", False, "no cache position left to compare in any layer", tolerance, figures, 0)
    for i in judged:
        failed = [errors[kv_cache_name(i, part)] for part in ("k", "v") if not errors[kv_cache_name(i, part)].passed]
        if failed:
            summary = (f"layer {i}: cache contents differ, rel {failed[0].rel:.2g} > {tol.kv_rel:g} over {positions} "
                       "positions (if the layers check passes: where does the backend write new K/V?)")  # fmt: skip
            return CheckResult("kv_cache", False, summary, tolerance, figures, i)
    worst = max((errors[kv_cache_name(i, part)] for i in judged for part in ("k", "v")), key=lambda e: e.rel)
    summary = f"{len(judged)} layers agree over {positions} written positions (largest rel error {worst.rel:.2g})"
    return CheckResult("kv_cache", True, summary + note, tolerance, figures)
