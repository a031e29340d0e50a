"""The exact structural check (calibration/structure.py): it passes what calibrate writes and fails each broken
quantizer with a message naming the tensor; and the tolerances of the accuracy report can all fail."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from calibration import calibrate as calibrate_mod
from calibration import quantize, report, structure
from calibration.calibrate import Plan, quantize_bundle
from export.compile.writer import BundleWriter
from runtime.contract.errors import UserError
from runtime.core.bundle import Bundle

ORIGINAL = quantize.quantize_weight


def _step(w, scale, scheme, block):
    return np.repeat(scale, block, axis=0)[: w.shape[0]] if scheme == "int4" else scale


def floor_rounding(w, scheme, block, importance=None):
    q, scale = ORIGINAL(w, scheme, block, importance)
    return np.clip(np.floor(w / _step(w, scale, scheme, block)), -8, 7).astype(np.int8), scale


def scales_on_the_wrong_axis(w, scheme, block, importance=None):
    """int8: one scale per input row instead of per output column (only square weights still fit the graph)."""
    if w.shape[0] != w.shape[1]:
        return ORIGINAL(w, scheme, block, importance)
    s = (np.abs(w).max(1) / 127).astype(np.float32)
    return np.clip(np.rint(w / s[:, None]), -128, 127).astype(np.int8), s


def blocks_in_reverse_order(w, scheme, block, importance=None):
    q, scale = ORIGINAL(w, scheme, block, importance)
    return q.reshape(-1, block, q.shape[1])[::-1].reshape(q.shape), scale[::-1].copy()


def doubled_scales(w, scheme, block, importance=None):
    q, scale = ORIGINAL(w, scheme, block, importance)
    return q, scale * 2


def swapped_nibbles(q, scale, scheme, name, original=quantize.weight_initializers):
    return original(q.reshape(-1, 2)[:, ::-1].reshape(q.shape), scale, scheme, name)


def hlora_quantized(model, graph, plan):
    return [m for m in quantize.weight_matmuls(model) if m.role in ("base", "lm_head", "hlora")]


def router_quantized(model, graph, plan):
    return [m for m in quantize.weight_matmuls(model) if m.role in ("base", "lm_head", "hlora", "router")]


MUTANTS = {  # name -> (scheme, H-LoRA A/B declared quantized, what is patched, the mutant)
    "floor rounding": ("int4", False, "quantize_weight", floor_rounding),
    "scales on the wrong axis": ("int8", False, "quantize_weight", scales_on_the_wrong_axis),
    "blocks in reverse order": ("int4", False, "quantize_weight", blocks_in_reverse_order),
    "doubled scales": ("int4", True, "quantize_weight", doubled_scales),
    "swapped nibbles": ("int4", False, "weight_initializers", swapped_nibbles),
    "H-LoRA quantized, not declared": ("int4", False, "_targets", hlora_quantized),
    "router quantized": ("int8", True, "_targets", router_quantized),
    "a norm weight changed by 1%": ("int4", False, "rewrite", None),  # made in the test: it needs the source bundle
}


def _quantized(src: Bundle, tmp, scheme: str, adapters: bool = False) -> Bundle:
    """What calibrate writes before its report (round to nearest: no calibration images needed)."""
    plan = Plan.of(scheme, 32, ("decoder",), "rtn", lm_head=True, adapters=adapters)
    manifest, _ = quantize_bundle(src, BundleWriter(tmp), plan, [])
    return Bundle(tmp, manifest, "")


@pytest.fixture(scope="module")
def src(m3_bundle):
    return Bundle.open(m3_bundle)


@pytest.mark.parametrize("scheme,adapters", [("int4", False), ("int8", False), ("int4", True), ("int8", True)])
def test_the_structural_check_passes_what_calibrate_writes(scheme, adapters, src, tmp_path):
    result = structure.check(src, _quantized(src, tmp_path, scheme, adapters))
    assert result.passed, result.problems
    # 9 MatMuls in each task's decoder (+ H-LoRA A and B of its 8 linears)
    assert result.weights == 2 * (9 + 16 * adapters) and 0 < result.max_rel_error < 0.2
    for diffs in result.graphs.values():
        assert diffs["unfused"] <= structure.RUN_RTOL and diffs["fused"] <= structure.FUSED_RTOL


def test_graphs_too_large_to_run_are_recorded_as_not_run(src, tmp_path, monkeypatch):
    """The full M3's decoders do not fit beside their dequantized weights: the runs are skipped by name and reason,
    never counted as compared, and the report says so."""
    monkeypatch.setattr(structure, "available_memory", lambda: 1)
    result = structure.check(src, _quantized(src, tmp_path, "int4"))
    assert result.passed and result.weights == 18 and not result.graphs  # every weight checked, no graph run
    assert set(result.not_run) == {"com.decoder", "gen.decoder"}
    assert all("GiB available" in why for why in result.not_run.values())
    assert result.to_json()["not_run"] == result.not_run


def _norm_changed(src: Bundle):
    original = quantize.rewrite

    def rewrite(model, quantized, scheme):
        out = original(model, quantized, scheme)
        read_by_mul = {i for n in out.graph.node if n.op_type == "Mul" for i in n.input}
        norm = next(i for i in out.graph.initializer if len(i.dims) == 1 and i.name in read_by_mul
                    and i.data_type == onnx.TensorProto.FLOAT)
        changed = numpy_helper.to_array(norm, base_dir=str(src.root)) * np.float32(1.01)
        norm.CopyFrom(numpy_helper.from_array(changed, norm.name))
        return out

    return rewrite


@pytest.mark.parametrize("name", MUTANTS)
def test_each_broken_quantizer_fails_the_structural_check_naming_the_tensor(name, src, tmp_path, monkeypatch):
    scheme, adapters, target, mutant = MUTANTS[name]
    module = calibrate_mod if target == "_targets" else quantize
    monkeypatch.setattr(module, target, mutant or _norm_changed(src))
    result = structure.check(src, _quantized(src, tmp_path, scheme, adapters), run=False)
    assert not result.passed, name
    fp_model = onnx.load(str(src.path("com", "decoder")), load_external_data=False)
    tensors = {i.name for i in fp_model.graph.initializer} | {n.name for n in fp_model.graph.node}
    for problem in result.problems:  # each says which graph and which tensor (or MatMul) is wrong
        assert problem.split(":")[0] in ("com.decoder", "gen.decoder"), problem
        assert any(t in problem for t in tensors), problem


def test_every_tolerance_can_fail():
    """No limit that every outcome meets, at any depth: each floor above 0 (or None: reported, not judged), each
    ceiling finite."""
    for scheme in report.TOLERANCES:
        for layers in (1, 4, 8, 18, 31, 32, 40):
            tol = report.tolerances(scheme, layers)
            for part in (tol, tol.vs_reference):
                for f in dataclasses.fields(part):
                    value = getattr(part, f.name)
                    if f.name.startswith("min_") or f.name in ("token_agreement", "gen_indices"):
                        assert value is None or value > 0, (scheme, layers, f.name)
                    elif f.name.startswith("max_"):
                        assert 0 < value < math.inf, (scheme, layers, f.name)
    assert report.TOLERANCES["int8"].min_greedy == 1 / 32  # the one greedy floor every measurement met


def test_limits_follow_the_depth_between_the_measured_ones():
    shallow, deep = report.TOLERANCES["int4"], report.DEEP["int4"]
    assert report.tolerances("int4", 2) == report.tolerances("int4", 4) == shallow
    assert report.tolerances("int4", 32) == report.tolerances("int4", 40) == deep
    mid = report.tolerances("int4", 18)  # halfway
    assert mid.max_mean_kl == pytest.approx((shallow.max_mean_kl + deep.max_mean_kl) / 2)
    assert mid.min_top1 == pytest.approx(shallow.min_top1 / 2)  # no floor at 32 layers: halfway to it
    assert deep.min_top1 is None and report.tolerances("w8a8", 32) == report.TOLERANCES["w8a8"]


def test_rewrite_keeps_a_graph_already_at_opset_21_or_later_and_leaves_its_input_alone():
    """Graphs with contrib ops (GenAI's, in benchmarks/quant_yardstick.py) cannot go through the version converter."""
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    before = model.SerializeToString()
    q, scale = quantize.quantize_weight(w, "int4", 32)
    out = quantize.rewrite(model, {"w": (quantize.weight_initializers(q, scale, "int4", "w"), 32)}, "int4")
    assert model.SerializeToString() == before
    assert [o.version for o in out.opset_import if o.domain == ""] == [22]
    assert [n.op_type for n in out.graph.node] == ["DequantizeLinear", "MatMul"]
    assert {i.name for i in out.graph.initializer} == {"w.qint4", "w.scale"}


def test_adapters_are_quantized_by_weight_only_schemes_only():
    assert Plan.of("int4", 64, ("decoder",), None, None).adapters  # the default: measured (calibrate.ADAPTERS)
    assert not Plan.of("w8a8", 64, ("decoder",), None, None).adapters
    with pytest.raises(UserError, match="keeps the H-LoRA matrices float"):
        Plan.of("fp8", 64, ("decoder",), None, None, adapters=True)
