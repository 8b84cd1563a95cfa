"""AOT compilation of the TopKMoE kernels to PTX (moetrt/plugins/ptx.py), no GPU needed.

The compile runs in a subprocess without TRITON_INTERPRET: test_kernels.py sets it for this process on
machines without CUDA, and triton would then hand out interpreted kernels that cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moetrt.plugins import ptx
from moetrt.plugins.kernels import geometry

# sm_80 and sm_90a in every dtype path, plus the Blackwell targets whose pinned PTX ISA differs (8.6, 8.7).
COMBOS = ((80, "float16"), (90, "float16"), (90, "bfloat16"), (80, "float32"), (100, "bfloat16"), (120, "float16"))
_COMPILE_ALL = (
    f"COMBOS = {COMBOS!r}\n"
    + """
import json
from moetrt.plugins import ptx
from moetrt.plugins.kernels import geometry
dims = geometry.MoeDims(hidden_size=64, intermediate_size=96, num_experts=8, top_k=2)
rows = []
for cc, dtype in COMBOS:
    for stage in geometry.STAGES:
        c = ptx.compile_stage(stage, dims, dtype, cc)
        rows.append({"cc": cc, "dtype": dtype, "stage": stage, "name": c.kernel_name, "params": list(c.params),
                     "declared": ptx.entry_params(c.ptx, c.kernel_name), "block_x": c.block_x,
                     "shared": c.shared_mem, "target": [l for l in c.ptx.splitlines() if l.startswith(".target")],
                     "version": [l for l in c.ptx.splitlines() if l.startswith(".version")],
                     "grid": [int(g) for g in c.grid(37)]})
print(json.dumps(rows))
"""
)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ALL], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_every_stage_compiles_for_each_target(compiled):
    assert {(r["cc"], r["dtype"], r["stage"]) for r in compiled} == {
        (cc, dt, st) for cc, dt in COMBOS for st in geometry.STAGES
    }  # fmt: skip
    for r in compiled:
        # triton emits the arch-specific sm_XXa from Hopper on (wgmma); sm_80 PTX is plain sm_80.
        assert r["target"] == [f".target sm_{r['cc']}" + ("a" if r["cc"] >= 90 else "")], r


def test_ptx_isa_is_pinned_to_what_the_drivers_accept(compiled):
    """Each stage's header states the pinned ISA, not the bundled ptxas's (triton 3.9: 8.8 / 9.4), and ptxas
    assembled it (triton.compile builds the cubin), so the kernels need nothing newer."""
    expected = {80: ".version 8.0", 90: ".version 8.0", 100: ".version 8.6", 120: ".version 8.7"}
    for r in compiled:
        assert r["version"] == [expected[r["cc"]]], r
    assert {cc: ptx.ptx_driver(cc) for cc in expected} == {80: "12.0", 90: "12.0", 100: "12.7", 120: "12.8"}


def test_ptx_isa_of_an_unknown_target_is_refused():
    with pytest.raises(ValueError, match="compute capability 70: no pinned PTX ISA"):
        ptx.ptx_isa(70)


def test_entry_declares_exactly_the_plugin_arguments(compiled):
    """TensorRT passes (inputs..., int32 extras..., outputs...): triton's hidden scratch pointers are gone."""
    for r in compiled:
        assert len(r["declared"]) == len(r["params"]) == len(ptx.SIGNATURES[r["stage"]]), r
        types = [ty for _, ty in ptx.SIGNATURES[r["stage"]]]
        for decl, ty in zip(r["declared"], types, strict=True):
            assert (".u64" in decl) == ty.startswith("*") and (".u32" in decl) == (ty == "i32"), (r["stage"], decl)


def test_launch_params(compiled):
    dims = geometry.MoeDims(hidden_size=64, intermediate_size=96, num_experts=8, top_k=2)
    for r in compiled:
        assert r["block_x"] == 32 * geometry.COMPILE_OPTIONS["num_warps"]
        assert 0 <= r["shared"] <= geometry.MAX_SHARED_BYTES
        assert tuple(r["grid"]) == geometry.grid(r["stage"], dims, 37)
    by_stage = {r["stage"]: r["grid"] for r in compiled}
    rows = 37 * 2 + 8 * (geometry.BLOCK_M - 1)
    assert by_stage["gemm1"] == [-(-rows // geometry.BLOCK_M), 2, 1]  # F = 96 in BLOCK_N = 64 columns
    assert by_stage["align"] == [1, 1, 1] and by_stage["combine"][0] == 37


_PTX = """.version 8.4
.target sm_80
.address_size 64
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
.reqntid 128
{
\tld.param.b64 %rd1, [k_param_0];
\tld.param.b32 %r1, [k_param_1];
\tBODY
\tret;
}
"""


def test_strip_hidden_params_drops_unused_trailing_params():
    out = ptx.strip_hidden_params(_PTX.replace("BODY", ""), "k", 2)
    assert ptx.entry_params(out, "k") == [".param .u64 .ptr .global .align 1 k_param_0", ".param .u32 k_param_1"]
    assert out.endswith(_PTX.replace("BODY", "")[_PTX.index(")") :])


def test_strip_hidden_params_refuses_a_used_param():
    with pytest.raises(RuntimeError, match="k_param_3 is used"):
        ptx.strip_hidden_params(_PTX.replace("BODY", "ld.param.b64 %rd2, [k_param_3];"), "k", 2)
    with pytest.raises(ValueError, match="declares 4 parameters"):
        ptx.strip_hidden_params(_PTX, "k", 5)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ptx.compile_stage(geometry.ROUTE, geometry.MoeDims(64, 96, 8, 2), "int8", 90)
