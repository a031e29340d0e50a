"""The exporter: bundle contents, TensorRT lint, per-graph parity on ONNX Runtime CPU, shared weights, caching."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from export.compile.bundle import export_bundle
from export.compile.lint import fp32_islands, lint
from export.parity.graphs import expect_graphs, graph_parity
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.image import load_image
from runtime.core.pipeline import Pipeline


def graphs_of(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return manifest, {g: onnx.load(str(bundle_dir / e["file"]), load_external_data=False)
                      for g, e in manifest["graphs"].items()}


def test_bundle_graphs_pass_checker_and_lint(m3_bundle):
    manifest, models = graphs_of(m3_bundle)
    assert set(models) == {"com.vision", "com.embed", "com.decoder", "gen.vision", "gen.embed", "gen.decoder",
                           "shared.vqgan"}
    for graph_id, model in models.items():
        onnx.checker.check_model(str(m3_bundle / manifest["graphs"][graph_id]["file"]), full_check=True)
        assert lint(model) == [], graph_id
        assert all(n.op_type not in ("If", "Loop", "Scan") for n in model.graph.node)
    # static dims where the task fixes them, named dynamic axes elsewhere
    dec = manifest["graphs"]["com.decoder"]["spec"]
    assert dec["dynamic_axes"]["inputs_embeds"] == {"1": "seq"}
    assert manifest["graphs"]["com.vision"]["spec"]["inputs"][0]["shape"] == [1, 3, 336, 336]
    assert manifest["graphs"]["shared.vqgan"]["spec"]["outputs"][0] == {"name": "image", "dtype": "uint8",
                                                                       "shape": [1, 256, 256, 3]}
    vision_in = models["com.vision"].graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in vision_in] == [1, 3, 336, 336]


def test_lint_rejects_contrib_ops_control_flow_and_old_opsets():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    nodes = [helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft"),
             helper.make_node("If", ["c"], ["z"]), helper.make_node("Relu", ["x"], ["w"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [x]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    problems = lint(model)
    assert any("opset 13" in p for p in problems)
    assert any("com.microsoft.FusedMatMul" in p for p in problems)
    assert any("If is not on the TensorRT allow-list" in p for p in problems)
    assert not any("Relu" in p for p in problems)


def test_shared_weights_stored_once(m3_bundle):
    manifest, _ = graphs_of(m3_bundle)
    tensors, graphs = manifest["weights"]["tensors"], manifest["graphs"]
    com, gen = set(graphs["com.decoder"]["initializers"]), set(graphs["gen.decoder"]["initializers"])
    shared = com & gen  # base Phi-3 weights: the same content, so the same name, in both tasks
    assert len(shared) >= 4 * manifest["config"]["layers"]
    assert set(graphs["com.vision"]["initializers"]) & set(graphs["gen.vision"]["initializers"])  # CLIP block 0
    nbytes = {n: int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize for n, t in tensors.items()}
    per_graph = sum(nbytes[n] for g in graphs.values() for n in g["initializers"])
    unique = sum(nbytes.values())
    weights_file = manifest["files"]["weights.bin"]["bytes"]
    # every tensor once: the file holds the unique bytes (plus page alignment), far less than the per-graph sum
    assert unique <= weights_file < unique + 4096 * (len(tensors) + 1)
    assert per_graph - unique >= sum(nbytes[n] for n in shared)
    # no graph carries another task's H-LoRA: task-only tensors of com never appear in gen's graphs
    com_only = com - gen
    assert com_only and not com_only & set().union(*(set(g["initializers"]) for k, g in graphs.items()
                                                     if k.startswith("gen.")))


@pytest.mark.parametrize("task", ["com", "gen"])
def test_graph_parity_m3(task, m3_bundle, m3_com, m3_gen, ct_small):
    ref = {"com": m3_com, "gen": m3_gen}[task]
    bundle = Bundle.open(m3_bundle)
    want = expect_graphs(ref, bundle.manifest.config.vocab, load_image(ct_small))
    checks = graph_parity(want, Pipeline(bundle, OrtBackend("cpu")))
    graphs = {c.graph for c in checks}
    assert {f"{task}.vision", f"{task}.embed", f"{task}.decoder"} <= graphs
    assert sum(c.graph.endswith("decoder") for c in checks) == 9  # prefill + 8 decode steps
    for c in checks:
        assert c.ok, c
    decoder = [c for c in checks if c.graph.endswith("decoder")]
    assert max(c.max_abs for c in decoder) < 1e-4 and min(c.cosine for c in decoder) > 0.999999


def test_graph_parity_l14_gqa(l14_bundle, l14_com, ct_small):
    manifest = Bundle.open(l14_bundle).manifest
    assert manifest.config.kv_heads < manifest.config.heads  # grouped-query attention
    assert list(manifest.tasks) == ["com"]
    want = expect_graphs(l14_com, manifest.config.vocab, load_image(ct_small))
    for c in graph_parity(want, Pipeline(Bundle.open(l14_bundle), OrtBackend("cpu"))):
        assert c.ok, c


def test_reexport_reuses_and_interrupted_export_leaves_no_bundle(m3_checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "b"
    export_bundle(m3_checkpoint, out, ("com",), "fp32", max_context=64)
    first = json.loads((out / "manifest.json").read_text())
    capsys.readouterr()
    export_bundle(m3_checkpoint, out, ("com",), "fp32", max_context=64)
    log = capsys.readouterr().out
    assert log.count("reused") == 3 and "exported" not in log
    assert json.loads((out / "manifest.json").read_text())["files"] == first["files"]

    import export.compile.bundle as eb

    calls = []

    def failing(spec, module, feeds, **kw):
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the second graph
        return real(spec, module, feeds, **kw)

    real = eb.export_graph
    monkeypatch.setattr(eb, "export_graph", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export_bundle(m3_checkpoint, fresh, ("com",), "fp32", max_context=32)
    assert not fresh.exists()  # nothing that looks like a bundle
    assert not (tmp_path / "fresh.partial" / "manifest.json").exists()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # a changed request on an existing bundle: the old one stays intact
        export_bundle(m3_checkpoint, out, ("com",), "fp32", max_context=48)
    assert json.loads((out / "manifest.json").read_text())["files"] == first["files"]
    Bundle.open(out)  # every sha256 still matches


def test_fp16_export_keeps_fp32_islands(m3_checkpoint, tmp_path):
    out = tmp_path / "fp16"
    manifest = export_bundle(m3_checkpoint, out, ("com",), "fp16", max_context=64)
    model = onnx.load(str(out / manifest.graphs["com.decoder"].file))
    assert fp32_islands(model) == []
    assert lint(model) == []
    types = {i.name: i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)}
    assert types["inputs_embeds"] == onnx.TensorProto.FLOAT16 and types["logits"] == onnx.TensorProto.FLOAT
