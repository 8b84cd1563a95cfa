"""Run every check of an engine against the eager model: the glue between inputs, runners and checks.

Two passes over the same prompts:
  graph pass    Polygraphy's Comparator runs the eager runner and the engine's graph on identical feed
                dicts (per batch: prefill, then one decode step over eager's caches) -> logits, layers,
                routing;
  runtime pass  `generate` drives an EagerBackend and the engine's own backend (which owns its caches)
                -> greedy tokens, then the KV caches both backends hold.
The runtime pass is what catches cache bookkeeping bugs the stateless graph pass cannot see.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from moetrt import names as io
from moetrt.model.mixtral import Mixtral
from moetrt.runtime.backend import Backend
from moetrt.runtime.eager_backend import EagerBackend
from moetrt.runtime.generate import generate
from moetrt.validate import checks
from moetrt.validate.checks import CheckResult, Divergence, Outputs
from moetrt.validate.inputs import Feed, Prompt, batches, decode_feed, prefill_feed
from moetrt.validate.runners import EagerRunner, EngineUnderTest, cache_dtype
from moetrt.validate.tolerances import Tolerance


def build_feeds(eager: EagerBackend, groups: Sequence[list[Prompt]], dtype: np.dtype) -> list[Feed]:
    """Per batch, the prefill feed and a decode feed over the caches eager filled at that prefill."""
    cfg = eager.config
    feeds = []
    for rows in groups:
        prefill = prefill_feed(rows, cfg, eager.max_seq_len, dtype)
        logits = eager.step(prefill.feed[io.INPUT_IDS], prefill.feed[io.POSITION_IDS])
        last = np.array([len(p.ids) - 1 for p in rows])
        next_tokens = logits[np.arange(len(rows)), last].argmax(-1)
        caches = {}
        for i in range(cfg.num_hidden_layers):
            k, v = eager.kv_cache(i)
            caches[io.past_key(i)] = k[: len(rows)].astype(dtype)
            caches[io.past_value(i)] = v[: len(rows)].astype(dtype)
        feeds += [prefill, decode_feed(rows, next_tokens, caches)]
    return feeds


def graph_checks(
    model: Mixtral, engine: EngineUnderTest, feeds: Sequence[Feed], tol: Tolerance
) -> tuple[list[CheckResult], checks.Contamination]:
    """logits, layers and routing from one Comparator run of both graphs over `feeds`, on the real tokens.

    A token whose routing flipped on a near-tie, and the later tokens of its row that attention mixed it
    into, are left out of the comparisons from there on (`checks.Contamination`): both sides are right,
    and their values may differ by O(1). The routing check counts such flips.
    """
    num_layers = model.config.num_hidden_layers
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        results = Comparator.run(
            [EagerRunner(model, engine.max_seq_len), engine.runner], data_loader=[f.feed for f in feeds]
        )
    (_, reference), (_, outputs) = results.items()
    routing = checks.routings(model, reference, outputs)
    tainted = checks.Contamination.from_routing(routing, feeds, tol.tie_margin)
    masks = {"new_key": tainted.at_kv, "new_value": tainted.at_kv, "moe_input": tainted.at_input,
             "moe_output": tainted.at_output}  # fmt: skip
    kept: tuple[list[Outputs], list[Outputs]] = ([{} for _ in feeds], [{} for _ in feeds])
    names = []
    for i in range(num_layers):
        for value, mask in masks.items():
            name = checks.layer_value(i, value)
            names.append(name)
            for n, feed in enumerate(feeds):
                keep = feed.real & ~mask[i][n]
                kept[0][n][name] = checks.keep_tokens(name, reference[n][name], keep)
                kept[1][n][name] = checks.keep_tokens(name, outputs[n][name], keep)
    last = tainted.at_output[-1]
    for n, feed in enumerate(feeds):
        for side, values in zip(kept, (reference, outputs), strict=True):
            side[n][io.LOGITS] = values[n][io.LOGITS][feed.real & ~last[n]]
    state_rel = {name: tol.state_rel for name in names} | {io.LOGITS: tol.logits_rel}
    errors = checks.compare(
        checks.run_results(*kept, ("eager", engine.runner.name)), [io.LOGITS, *names], state_rel.get
    )
    blocks = checks.moe_block_outputs(model, outputs, feeds, tol.tie_margin)
    block_names = [checks.moe_block(i) for i in range(num_layers)]
    errors |= checks.compare(checks.run_results(*blocks, ("reference-moe", engine.runner.name)), block_names,
                             lambda _: tol.moe_rel)  # fmt: skip
    excluded = sum(int((f.real & m).sum()) for f, m in zip(feeds, last, strict=True))
    logits = [np.concatenate([it[io.LOGITS] for it in side]).astype(np.float32) for side in kept]
    results = [
        checks.check_logits(errors[io.LOGITS], *logits, excluded, tol),
        checks.check_layers(errors, num_layers, tol),
        checks.check_routing(routing, feeds, tainted, tol),
    ]
    return results, tainted


class RecordingBackend:
    """A Backend that keeps every step's logits: a divergence is judged on eager's own margins, and the
    step where an engine's logits depart from eager's bounds the cache positions worth comparing."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name, self.config = backend.name, backend.config
        self.max_batch, self.max_seq_len = backend.max_batch, backend.max_seq_len
        self.logits: list[np.ndarray] = []

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        logits = self.backend.step(input_ids, position_ids)
        self.logits.append(logits)
        return logits

    def row_logits(self, row: int, prompt_len: int) -> list[np.ndarray]:
        """The logits `generate` sampled each of a row's tokens from: prefill's at the prompt's last
        position, then each decode step's one."""
        return [self.logits[0][row, prompt_len - 1]] + [out[row, 0] for out in self.logits[1:]]

    def kv_cache(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.backend.kv_cache(layer)

    def close(self) -> None:
        self.backend.close()


def runtime_checks(
    eager: EagerBackend,
    engine: Backend,
    groups: Sequence[list[Prompt]],
    prompt_taint: Sequence[list[np.ndarray]],
    steps: int,
    tol: Tolerance,
) -> list[CheckResult]:
    """greedy and kv_cache: each batch generated on both backends, then their caches compared.

    The caches are compared where both sides wrote K/V from identical tokens that no near-tie routing flip
    touched: `prompt_taint[g][i]` [batch, seq] marks the prompt tokens of batch g whose layer-i K/V such a
    flip contaminated in the graph pass (the same prefill computation; the row's decode positions are then
    contaminated too), and a row's decode positions stop before its tokens diverge or its logits depart
    from eager's beyond `logits_rel` (the sign of a flip during decode, where routing is not observed).
    """
    num_layers = eager.config.num_hidden_layers
    rows: list[Divergence] = []
    reference_caches: list[Outputs] = []
    engine_caches: list[Outputs] = []
    positions = 0
    for group, taint in zip(groups, prompt_taint, strict=True):
        prompts = [p.ids for p in group]
        ref_steps, eng_steps = RecordingBackend(eager), RecordingBackend(engine)
        ref = generate(ref_steps, prompts, steps, stop_token_ids=())
        eng = generate(eng_steps, prompts, steps, stop_token_ids=())
        spans = []
        for r, prompt in enumerate(group):
            ref_logits, eng_logits = ref_steps.row_logits(r, len(prompt.ids)), eng_steps.row_logits(r, len(prompt.ids))
            d = checks.divergence(prompt.label, ref.tokens[r], eng.tokens[r], ref_logits, tol)
            rows.append(d)
            departed = next((s for s, (a, b) in enumerate(zip(ref_logits, eng_logits, strict=True))
                             if np.abs(a - b).max() > tol.logits_rel * np.abs(a).max()), steps)  # fmt: skip
            # Decode token j is fed at step j + 1 (position len + j); step s's logits departing may come from
            # a flip while writing token s - 1.
            fed = max(0, min(steps if d.first is None else d.first, departed - 1, steps - 1))
            spans.append(len(prompt.ids) + fed)
        positions += sum(spans)
        ref_values, eng_values = {}, {}
        for i in range(num_layers):
            # Per row, the compared positions [0, span) less those a near-tie flip contaminated.
            keep = []
            for r, (prompt, span) in enumerate(zip(group, spans, strict=True)):
                tainted = taint[i][r, : len(prompt.ids)]
                keep.append(np.concatenate([~tainted, np.full(span - len(prompt.ids), not tainted.any())]))
            for part, ref_cache, eng_cache in zip(("k", "v"), eager.kv_cache(i), engine.kv_cache(i), strict=True):
                name = checks.kv_cache_name(i, part)
                ref_values[name] = np.concatenate([ref_cache[r, :, : len(k)][:, k] for r, k in enumerate(keep)], 1)
                eng_values[name] = np.concatenate([eng_cache[r, :, : len(k)][:, k] for r, k in enumerate(keep)], 1)
        reference_caches.append(ref_values)
        engine_caches.append(eng_values)
    kv_names = [checks.kv_cache_name(i, part) for i in range(num_layers) for part in ("k", "v")]
    kv_run = checks.run_results(reference_caches, engine_caches, ("eager", engine.name))
    kv_errors = checks.compare(kv_run, kv_names, lambda _: tol.kv_rel)
    return [checks.check_greedy(rows, tol), checks.check_kv_cache(kv_errors, num_layers, positions, tol)]


def run_suite(
    model: Mixtral, engine: EngineUnderTest, prompts: Sequence[Prompt], steps: int, batch: int, tol: Tolerance
) -> list[CheckResult]:
    """All five checks, in the order a person reads them: logits, layers, routing, greedy, kv_cache."""
    groups = batches(list(prompts), batch)
    eager = EagerBackend(model, batch, engine.max_seq_len)
    feeds = build_feeds(eager, groups, cache_dtype(engine.dtype))
    results, tainted = graph_checks(model, engine, feeds, tol)
    prompt_taint = [[layer[2 * g] for layer in tainted.at_kv] for g in range(len(groups))]  # the prefill feeds
    backend = engine.load_backend(batch)
    try:
        results += runtime_checks(eager, backend, groups, prompt_taint, steps, tol)
    finally:
        backend.close()
    return results
