"""tritonserver as a child process: started on 127.0.0.1 from a model repository, waited for until the model is
ready (or has failed to load, with Triton's reason), checked with the self-test model, stopped by SIGTERM to its PID.

Only the standard library: `python -m runtime serve` runs in the runtime's own environment (numpy 2 is fine there);
only the server runs in the serving venv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.frontends.serving.environment import Environment
from runtime.frontends.serving.repository import MODEL, SELFTEST

HOST = "127.0.0.1"
# Exact in float32 and doubled exactly; JSON carries them exactly (shortest round-trip decimal).
SELFTEST_INTS = [1, 2, 3, 4]
SELFTEST_FLOATS = [0.1, -2.5, 1e-30, 3.0e38 / 4, 1.0 / 3.0]


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


class Server:
    def __init__(self, env: Environment, repository: Path, ports: Ports = Ports(), log: Path | None = None):
        self.env, self.repository, self.ports = env, Path(repository).resolve(), ports
        self.log = Path(log) if log else self.repository / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://{HOST}:{self.ports.http}"

    @property
    def grpc(self) -> str:
        return f"{HOST}:{self.ports.grpc}"

    @property
    def metrics(self) -> str:
        return f"http://{HOST}:{self.ports.metrics}/metrics"

    def start(self) -> Server:
        cmd = [str(self.env.tritonserver), f"--model-repository={self.repository}",
               f"--backend-directory={self.env.backends}",
               f"--http-address={HOST}", f"--http-port={self.ports.http}",
               f"--grpc-address={HOST}", f"--grpc-port={self.ports.grpc}",
               f"--metrics-address={HOST}", f"--metrics-port={self.ports.metrics}",
               "--allow-gpu-metrics=false",
               "--exit-on-error=false",  # a model that fails to load is reported as not ready, with its reason
               "--disable-auto-complete-config"]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # A session of its own: a terminal's Ctrl-C reaches us, and we stop the server by SIGTERM.
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env.environ(),
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 600) -> None:
        """Until the model is ready; UserError with Triton's reason when it failed to load or the server died."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"tritonserver exited with status {self.process.returncode} "
                                f"(log: {self.log}): {self.log_tail()}")
            if self.model_ready():
                return
            state = self.model_state()
            if state and state.get("state") == "UNAVAILABLE" and state.get("reason"):
                raise UserError(f"model {MODEL} failed to load: {' '.join(state['reason'].split())}")
            time.sleep(0.2)
        raise UserError(f"model {MODEL} not ready after {timeout:.0f} s (log: {self.log})")

    def model_ready(self, model: str = MODEL) -> bool:
        return self._get(f"/v2/models/{model}/ready") == 200

    def model_state(self, model: str = MODEL) -> dict | None:
        status, body = self._request("/v2/repository/index", b"{}")
        if status != 200:
            return None
        return next((m for m in json.loads(body) if m.get("name") == model), None)

    def selftest(self) -> None:
        """Send the self-test tensors over HTTP and refuse a server whose stub does not return them doubled."""
        body = json.dumps({"inputs": [
            {"name": "ints", "datatype": "INT64", "shape": [len(SELFTEST_INTS)], "data": SELFTEST_INTS},
            {"name": "floats", "datatype": "FP32", "shape": [len(SELFTEST_FLOATS)], "data": SELFTEST_FLOATS}]})
        status, reply = self._request(f"/v2/models/{SELFTEST}/infer", body.encode())
        got = {o["name"]: o["data"] for o in json.loads(reply).get("outputs", [])} if status == 200 else {}
        import numpy as np  # float32 arithmetic, as the stub does it

        want = {"ints": [2 * v for v in SELFTEST_INTS],
                "floats": (np.array(SELFTEST_FLOATS, np.float32) * 2).tolist()}
        if got.get("ints") != want["ints"] or np.array(got.get("floats", []), np.float32).tolist() != want["floats"]:
            raise UserError(f"the server's self-test failed: sent {SELFTEST_INTS} and {SELFTEST_FLOATS}, expected "
                            f"them doubled, got {got or reply[:200]!r} (a python-backend stub running under numpy "
                            "2 corrupts tensors; the serving venv pins numpy 1.26)")

    def stop(self, timeout: float = 120) -> int | None:
        """SIGTERM and wait (it can take a while to unload); SIGKILL only if it outlives `timeout`. Then end what is
        left of its process group: the python-backend stubs of a server that died outlive it by up to a minute."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # the group start() made, led by the server's PID
        except ProcessLookupError:
            pass
        return self.process.returncode

    def group_alive(self) -> bool:
        """Whether any process of the server's group (the server, its stubs) is still running."""
        assert self.process is not None, "start() first"
        try:
            os.killpg(self.process.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _get(self, path: str) -> int:
        return self._request(path)[0]

    def _request(self, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.http + path, data=body), timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b""
