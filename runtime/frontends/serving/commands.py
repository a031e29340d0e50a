"""`python -m runtime triton` (write a model repository) and `python -m runtime serve` (run tritonserver on it).

A runtime command rather than `build.py triton`: a serving host has the runtime but not the build dependencies
(torch), and the repository needs nothing but the bundle's manifest.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.core.verdict import OVERRIDE


def add_commands(sub) -> None:
    from runtime.frontends.args import number, positive_int

    port = number(int, lambda v: 1 <= v <= 65535, "must be a port number (1..65535)")
    repo = argparse.ArgumentParser(add_help=False)
    group = repo.add_argument_group("model repository")
    group.add_argument("--instances", type=positive_int, default=1, metavar="N",
                       help="model instances (each one process with the bundle open, one request at a time): per "
                            "server with --kind cpu, per GPU with --kind gpu (default 1)")
    group.add_argument("--kind", choices=["cpu", "gpu"], default="cpu",
                       help="Triton instance kind: cpu (KIND_CPU, default) or gpu (KIND_GPU, with --gpus)")
    group.add_argument("--gpus", type=lambda s: tuple(int(g) for g in s.split(",")), metavar="0,1",
                       help="with --kind gpu: the GPUs to place instances on (default: all)")
    group.add_argument("--backend", choices=["ort", "trt"], default="ort",
                       help="runtime backend in each instance (default ort; trt needs --kind gpu and engines)")
    group.add_argument("--providers", choices=["auto", "cpu", "cuda", "tensorrt"],
                       help="ONNX Runtime providers (default: cpu with --kind cpu, cuda with --kind gpu)")
    group.add_argument("--prepack", action="store_true",
                       help="let ONNX Runtime's CPU provider prepack weights per session: faster decode, but the "
                            "base decoder held twice per instance (both tasks are resident); default off")
    group.add_argument(OVERRIDE, action="store_true",
                       help="serve a bundle whose quantization or parity report FAILED (refused by default; the "
                            "server log says so at every start)")

    t = sub.add_parser("triton", parents=[repo], help="write a Triton model repository for a bundle",
                       description="Write a Triton Inference Server model repository serving the bundle (referenced "
                                   "by path, not copied): model `healthgpt` (python backend, decoupled streaming, "
                                   "com and gen resident, task per request) and `healthgpt_selftest`.")
    t.add_argument("--bundle", type=Path, required=True, metavar="DIR", help="bundle directory")
    t.add_argument("--out", type=Path, required=True, metavar="REPO", help="model repository to write")
    t.set_defaults(run=cmd_triton)

    s = sub.add_parser("serve", parents=[repo], help="serve a bundle with tritonserver (gRPC, HTTP, metrics)",
                       description="Serve a bundle with NVIDIA Triton Inference Server on 127.0.0.1: creates the "
                                   "serving venv on first use (.venv-serving: nvidia-pytriton 0.7.0's tritonserver "
                                   "2.51, numpy 1.26, the runtime), writes a model repository (or serves --repo), "
                                   "waits until the model is ready and passes a tensor self-test, prints the "
                                   "endpoints, and runs until Ctrl-C or SIGTERM, then stops the server.")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", type=Path, metavar="DIR", help="bundle to serve (a repository is written for it)")
    what.add_argument("--repo", type=Path, metavar="REPO", help="serve this repository (from `triton`) as it is")
    s.add_argument("--out", type=Path, metavar="REPO",
                   help="with --bundle: where to write the repository (default: a new temporary folder)")
    s.add_argument("--http-port", type=port, default=8000, metavar="P", help="HTTP/REST port (default 8000)")
    s.add_argument("--grpc-port", type=port, default=8001, metavar="P", help="gRPC port (default 8001)")
    s.add_argument("--metrics-port", type=port, default=8002, metavar="P", help="Prometheus metrics (default 8002)")
    s.add_argument("--venv", type=Path, metavar="DIR", help="serving venv (default: .venv-serving in the checkout)")
    s.add_argument("--log", type=Path, metavar="FILE", help="server log (default: REPO/tritonserver.log)")
    s.add_argument("--timeout", type=positive_int, default=600, metavar="S",
                   help="give up when the model is not ready after S seconds (default 600)")
    s.set_defaults(run=cmd_serve)


def _options(a):
    from runtime.frontends.serving.repository import Options

    return Options(a.instances, a.kind, a.gpus or (), a.backend, a.providers, a.prepack,
                   getattr(a, "allow_failed_verification", False))


def cmd_triton(a) -> int:
    from runtime.frontends.serving.repository import write

    print(f"[I] model repository written to {write(a.bundle, a.out, _options(a))}")
    return 0


def cmd_serve(a) -> int:
    from runtime.frontends.serving import environment, repository

    if a.repo is not None and a.out is not None:
        raise UserError("--out applies to --bundle (the repository to write); --repo is served as it is")
    if a.repo is not None and not (a.repo / repository.MODEL / "config.pbtxt").is_file():
        raise UserError(f"{a.repo} is not a model repository written by `python -m runtime triton` "
                        f"(no {repository.MODEL}/config.pbtxt)")
    env = environment.ensure(a.venv, log=lambda m: print(m, file=sys.stderr, flush=True))
    temporary = Path(tempfile.mkdtemp(prefix="healthgpt-triton-")) if a.repo is None and a.out is None else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the finally blocks below
    try:
        if a.repo is not None:
            repo = a.repo
        else:
            out = a.out or temporary
            assert out is not None  # with neither --repo nor --out, temporary is made
            repo = repository.write(a.bundle, out, _options(a))
        _serve(a, env, repo)
    except (KeyboardInterrupt, SystemExit):  # a clean stop: the temporary repository (and its log) goes
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    except BaseException:  # a failure: the temporary repository stays, for its log
        if temporary is not None:
            print(f"[I] kept {temporary} (tritonserver.log inside)", file=sys.stderr, flush=True)
        raise
    return 0


def _serve(a, env, repo: Path) -> None:
    from runtime.frontends.serving import repository
    from runtime.frontends.serving.server import Ports, Server

    server = Server(env, repo, Ports(a.http_port, a.grpc_port, a.metrics_port), a.log)
    server.start()
    assert server.process is not None  # start() made it
    info = lambda m: print(f"[I] {m}", file=sys.stderr, flush=True)  # noqa: E731
    info(f"tritonserver pid {server.process.pid}, repository {repo}, log {server.log}")
    try:
        server.wait_ready(a.timeout)
        server.selftest()
        print(f"[I] ready: gRPC {server.grpc} (python -m runtime ask --server grpc://{server.grpc} ...), "
              f"HTTP {server.http}/v2/models/{repository.MODEL}/generate_stream, metrics {server.metrics}",
              flush=True)
        server.process.wait()
        raise UserError(f"tritonserver exited with status {server.process.returncode}: {server.log_tail()}")
    finally:
        if server.process.poll() is None:
            info(f"stopping tritonserver (pid {server.process.pid})")
        server.stop()
