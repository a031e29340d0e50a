"""Stops leave nothing behind and come promptly (issue 24, class 6): SIGTERM during calibrate is handled as Ctrl-C is;
Ctrl-C ends a long ONNX Runtime run at its next node (RunOptions.terminate). `serve`'s temporary repository:
test_serving.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_during_calibrate_leaves_nothing(m3_bundle, tmp_path):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "build.py", "calibrate", "--bundle", str(m3_bundle), "--out", str(out),
                             "--scheme", "int8", "--samples", "2"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.with_name("q.partial").exists():  # terminated while it writes the bundle
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    assert "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []


def test_a_stop_inside_a_constructor_prints_one_line(tmp_path):
    """CI once caught SIGTERM landing inside tqdm's constructor: the half-built bar's __del__ then failed as the unwound
    frames were freed, and its traceback followed "terminated". The same, made to happen every time."""
    code = """
import sys
import build

class HalfBuilt:
    def __init__(self):
        raise build.Terminated  # the signal lands here, before the attribute that __del__ reads is set
        self.pos = 0

    def __del__(self):
        self.pos

build.cmd_synth = lambda args: HalfBuilt()
sys.exit(build.main(["synth", "--out", sys.argv[1]]))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (143, "terminated\n"), proc.stderr


LONG_RUN = r"""
import sys, time, types
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from runtime.core.backend import OrtGraph

n, nodes = 512, 2000
w = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
chain = [helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]) for i in range(nodes)]
graph = helper.make_graph(chain, "long", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info(f"x{nodes}", TensorProto.FLOAT, [n, n])], [w])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
g = OrtGraph(session, types.SimpleNamespace(output_names=[f"x{nodes}"]))
x = np.ones((n, n), np.float32)
print("running", flush=True)
start = time.monotonic()
try:
    g.run({"x0": x})
except KeyboardInterrupt:
    print(f"interrupted {time.monotonic() - start:.2f}", flush=True)
    sys.exit(130)
print(f"finished {time.monotonic() - start:.2f}", flush=True)
"""


def test_ctrl_c_ends_a_long_onnx_runtime_run(tmp_path):
    """A 2000-node chain (about 8 s on one thread here) interrupted 0.5 s in ends within a second or two."""
    proc = subprocess.Popen([sys.executable, "-c", LONG_RUN], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "running\n", proc.stderr.read()
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130 and out.startswith("interrupted"), (out, err)
    assert waited < 3, f"the run went on for {waited:.1f} s after Ctrl-C"
