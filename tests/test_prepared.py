"""Prepared sessions (runtime/core/prepared.py): ONNX Runtime's optimized graph with its prepacked weights, kept per
machine and loaded instead of optimizing again; sealed, so a changed file is caught and prepared again."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.core import prepared
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle


def outputs(graph) -> list[np.ndarray]:
    feeds = graph.spec.sample_inputs(np.random.default_rng(0), **{d: min(8, v.max) for d, v in graph.spec.dims.items()})
    return list(graph.run(feeds).values())


def entries() -> list:
    root = prepared.root()
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_prepared_session_is_made_once_and_computes_what_the_graph_computes(m3_bundle, cache, monkeypatch, capsys):
    bundle = Bundle.open(m3_bundle)
    want = outputs(OrtBackend("cpu", session_cache=False).load(bundle, "com", "decoder"))
    assert entries() == []
    first = OrtBackend("cpu", session_cache=True).load(bundle, "com", "decoder")
    (entry,) = entries()
    assert {p.name for p in entry.iterdir()} == {prepared.GRAPH, prepared.DATA, prepared.SEAL}
    assert "preparing com.decoder for this machine" in capsys.readouterr().err
    monkeypatch.setattr(prepared, "prepare", lambda *a: pytest.fail("prepared again"))
    again = OrtBackend("cpu", session_cache=True).load(bundle, "com", "decoder")
    for got in (outputs(first), outputs(again)):
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_changed_prepared_file_is_set_aside_and_prepared_again(m3_bundle, cache, capsys):
    bundle = Bundle.open(m3_bundle)
    OrtBackend("cpu", session_cache=True).load(bundle, "com", "decoder")
    (entry,) = entries()
    data = entry / prepared.DATA
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    graph = OrtBackend("cpu", session_cache=True).load(bundle, "com", "decoder")
    assert "does not match its seal" in capsys.readouterr().err
    (fresh,) = entries()
    assert fresh.name == entry.name and (fresh / prepared.DATA).read_bytes() != bytes(raw)
    want = outputs(OrtBackend("cpu", session_cache=False).load(bundle, "com", "decoder"))
    for a, b in zip(outputs(graph), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_no_cache_when_turned_off_shared_or_for_a_float_bundle_by_default(m3_bundle, cache, monkeypatch):
    bundle = Bundle.open(m3_bundle)
    OrtBackend("cpu").load(bundle, "com", "embed")  # fp32: not by default
    monkeypatch.setenv("HEALTHGPT_EDGE_NO_SESSION_CACHE", "1")
    OrtBackend("cpu", session_cache=True).load(bundle, "com", "embed")
    assert entries() == []
    monkeypatch.delenv("HEALTHGPT_EDGE_NO_SESSION_CACHE")
    prepared.root().mkdir(parents=True)
    prepared.root().chmod(0o777)  # others could write into it: never read nor written
    OrtBackend("cpu", session_cache=True).load(bundle, "com", "embed")
    assert entries() == []
    prepared.root().chmod(0o700)
    OrtBackend("cpu", session_cache=True).load(bundle, "com", "embed")
    assert len(entries()) == 1


def test_prepare_makes_every_graph_of_a_bundle_ready(m3_bundle, cache, capsys):
    from runtime.frontends.cli import main

    assert main(["prepare", "--bundle", str(m3_bundle)]) == 0
    assert entries() == []  # fp32: nothing quantized, nothing prepared unless --all
    assert main(["prepare", "--bundle", str(m3_bundle), "--all"]) == 0
    graphs = Bundle.open(m3_bundle).manifest.graphs
    assert len(entries()) == len(graphs)
    err = capsys.readouterr().err
    assert all(f"{gid}: ready in" in err for gid in graphs)
    assert main(["prepare"]) == 2 and "prepare needs --bundle" in capsys.readouterr().err


def test_auto_providers_use_prepared_sessions_where_only_the_cpu_can_load(m3_bundle, cache, monkeypatch):
    from runtime.core import backend as backend_mod

    bundle = Bundle.open(m3_bundle)
    monkeypatch.setattr(backend_mod, "why_not_loadable", lambda ort, p: "no CUDA here")
    auto = OrtBackend("auto", session_cache=True)
    auto.load(bundle, "com", "embed")
    assert len(entries()) == 1 and auto._cpu_only(("CUDAExecutionProvider", "CPUExecutionProvider"))
    monkeypatch.setattr(backend_mod, "why_not_loadable", lambda ort, p: None)  # a GPU that loads: not prepared
    assert not OrtBackend("auto", session_cache=True)._cpu_only(("CUDAExecutionProvider", "CPUExecutionProvider"))


def test_a_failed_preparation_falls_back_to_the_plain_session(m3_bundle, cache, monkeypatch, capsys):
    bundle = Bundle.open(m3_bundle)

    def full_disk(folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepared, "_realign", full_disk)
    graph = OrtBackend("cpu", session_cache=True).load(bundle, "com", "decoder")
    assert "could not prepare com.decoder (OSError" in capsys.readouterr().err
    assert entries() == [] and not any(prepared.root().iterdir())  # nothing half-written left behind
    want = outputs(OrtBackend("cpu", session_cache=False).load(bundle, "com", "decoder"))
    for a, b in zip(outputs(graph), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
