"""Shared fixtures: synthetic checkpoints, references and bundles, each built once per test session."""

from __future__ import annotations

import pytest

INSTRUCTION = "Reconstruct the image."


@pytest.fixture(scope="session", autouse=True)
def private_verified_record(tmp_path_factory):
    """The record of hashed files (runtime/core/verified.py) in a folder of this session's, for it and its children."""
    import os

    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(scope="session", autouse=True)
def interruptible_children():
    """The tests that press Ctrl-C on a CLI (SIGINT) need it to reach Python's handler there. A suite started in the
    background by a non-interactive shell inherits SIGINT *ignored*, which exec passes on and Python then respects;
    a caught signal is reset to the default by exec instead, so catching it here gives every child the default."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny reference models are overhead-bound: a second torch thread only waits (10x slower on a busy host)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def m3_checkpoint(tmp_path_factory):
    from export.synth.checkpoint import synthesize

    return synthesize(tmp_path_factory.mktemp("ckpt") / "m3", "m3", "tiny", seed=0).root


@pytest.fixture(scope="session")
def l14_checkpoint(tmp_path_factory):
    from export.synth.checkpoint import synthesize

    return synthesize(tmp_path_factory.mktemp("ckpt") / "l14", "l14", "tiny", seed=1).root


@pytest.fixture(scope="session")
def m3_com(m3_checkpoint):
    from export.reference.model import load_reference

    return load_reference(m3_checkpoint, "com")


@pytest.fixture(scope="session")
def m3_gen(m3_checkpoint):
    from export.reference.model import load_reference

    return load_reference(m3_checkpoint, "gen")


@pytest.fixture(scope="session")
def l14_com(l14_checkpoint):
    from export.reference.model import load_reference

    return load_reference(l14_checkpoint, "com")


@pytest.fixture(scope="session")
def m3_bundle(m3_checkpoint, tmp_path_factory):
    from export.compile.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "m3"
    export_bundle(m3_checkpoint, out, ("com", "gen"), "fp32", max_context=2048)
    return out


@pytest.fixture(scope="session")
def l14_bundle(l14_checkpoint, tmp_path_factory):
    from export.compile.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "l14"
    export_bundle(l14_checkpoint, out, ("com",), "fp32", max_context=1024)
    return out


@pytest.fixture(scope="session")
def m3_gen_tokens(m3_gen, ct_small):
    """The reference's 1024 constrained GEN tokens for CT_small (HF generate, the slowest step: computed once)."""
    from runtime.core.image import load_image

    ref = m3_gen
    embeds = ref.encode_image(ref.pixel_values(load_image(ct_small)))
    return ref.generate(ref.prompt_ids(INSTRUCTION), embeds, 1100, constrain_image_tokens=True)


@pytest.fixture(scope="session")
def ct_small():
    from pydicom.data import get_testdata_file

    return get_testdata_file("CT_small.dcm")


@pytest.fixture
def bundle_dir(tmp_path):
    """A hand-made tiny bundle (no exporter involved), for the engine and TensorRT-backend tests."""
    from tiny_bundle import make_bundle

    return make_bundle(tmp_path / "bundle")


@pytest.fixture(scope="session")
def serving_env():
    """The serving venv (tritonserver, numpy 1.26, the runtime), made on first use; a skip, saying why, only when its
    packages cannot be installed here."""
    import sys

    from runtime.contract.errors import UserError
    from runtime.frontends.serving import environment

    try:
        return environment.ensure(log=lambda m: print(m, file=sys.stderr))
    except UserError as e:
        if "install the serving dependencies" in str(e) or "create the serving venv" in str(e):
            pytest.skip(f"the serving venv cannot be installed here: {e}")
        raise


@pytest.fixture(scope="session")
def serving_pipe(m3_bundle):
    """The expected side of the serving tests, opened as the repository opens it: prepack off (both tasks resident),
    CPU provider."""
    from runtime.core.backend import OrtBackend
    from runtime.core.bundle import Bundle
    from runtime.core.pipeline import Pipeline

    return Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", prepack=False))
