"""The streaming export (export/compile/stream.py): its memory does not grow with the decoder's depth, and its own
reader of the release files accounts for every key as strictly as the reference's loader."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.compile.bundle import export_bundle
from export.synth.checkpoint import Size, synthesize
from runtime.contract.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Wide enough that a decoder layer (19 MB in fp32 with its H-LoRA) stands out of the process's RSS noise.
PROBE = Size(hidden=512, layers=2, heads=8, kv_heads=8, intermediate=2048)
LAYER_MB = 19
PEAK = """import resource, runpy, sys
sys.argv = ["build.py", *sys.argv[1:]]
try:
    runpy.run_path("build.py", run_name="__main__")
finally:
    print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def _export_peak_mb(ckpt: Path, out: Path) -> float:
    r = subprocess.run([sys.executable, "-c", PEAK, "export", "--checkpoint", str(ckpt), "--out", str(out),
                        "--tasks", "com", "--max-context", "64"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stderr.rsplit("peak_kib", 1)[1].split()[0]) / 1024


def test_export_memory_does_not_grow_with_depth(tmp_path):
    """2 vs 8 layers: holding every layer (the reference model, then the ONNX copy) adds 2-3 layers' bytes per
    extra layer; streaming holds one layer at a time (measured here: +3.6 MB per layer, the graph's own nodes)."""
    peaks = {}
    for layers in (2, 8):
        ckpt = tmp_path / f"ck{layers}"
        synthesize(ckpt, "m3", Size(**{**PROBE.__dict__, "layers": layers}), seed=0)
        peaks[layers] = _export_peak_mb(ckpt, tmp_path / f"b{layers}")
    per_layer = (peaks[8] - peaks[2]) / 6
    assert per_layer < 0.5 * LAYER_MB, f"export peak RSS {peaks}: +{per_layer:.1f} MB per layer"


@pytest.fixture
def broken(m3_checkpoint, tmp_path):
    def make(edit):
        ck = Path(shutil.copytree(m3_checkpoint, tmp_path / "ck"))
        path = ck / "HealthGPT-M3" / "com_hlora_weights.bin"
        sd = torch.load(path, weights_only=True)
        edit(sd)
        torch.save(sd, path)
        return ck
    return make


def test_a_stray_tensor_is_an_error_naming_it(broken, tmp_path):
    ck = broken(lambda sd: sd.update({"base_model.model.model.layers.99.mlp.down_proj.lora_A.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"1 unexpected tensor\(s\).*layers\.99\.mlp\.down_proj\.lora_A"):
        export_bundle(ck, tmp_path / "b", ("com",), max_context=32)
    assert not (tmp_path / "b").exists()


def test_a_missing_tensor_is_an_error_naming_it(broken, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"
    ck = broken(lambda sd: sd.pop(key))
    with pytest.raises(UserError, match=f"the checkpoint has no {key}".replace(".", r"\.")):
        export_bundle(ck, tmp_path / "b", ("com",), max_context=32)
