"""A Triton model repository for a bundle: `healthgpt` (the runtime's Pipeline, decoupled, both tasks resident) and
`healthgpt_selftest` (doubles a tensor: catches a stub that corrupts tensors, e.g. under the wrong numpy).

The bundle is referenced by its absolute path, not copied; model.py only names the runtime's model class, so the
repository needs the runtime installed where the stub runs (the serving venv, or `pip install` in NGC's container).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.files import write_atomic
from runtime.core.bundle import Bundle
from runtime.core.verdict import require

MODEL, SELFTEST = "healthgpt", "healthgpt_selftest"
KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class BundleFacts:
    """What serving needs from a manifest, read in this one place."""
    tasks: tuple[str, ...]
    idx_0: int  # id of <idx_0>
    vq_codes: int
    image_tokens: int  # indices per image


def bundle_facts(bundle: Bundle) -> BundleFacts:
    t = bundle.manifest.tokens
    return BundleFacts(tuple(bundle.tasks), t.idx_0, t.vq_codes, t.image_tokens)


@dataclass(frozen=True)
class Options:
    instances: int = 1  # per CPU, or per listed GPU
    kind: str = "cpu"
    gpus: tuple[int, ...] = ()  # KIND_GPU: which GPUs (default: all)
    backend: str = "ort"
    providers: str | None = None  # default: cpu for KIND_CPU, cuda for KIND_GPU
    prepack: bool = False  # both tasks resident: one copy of the shared weights (see OrtBackend)
    allow_failed: bool = False  # serve a bundle that failed its verification (each instance logs it at start)


def write(bundle: str | Path, out: str | Path, opts: Options = Options()) -> Path:
    """The repository; refused for a bundle that failed its verification unless opts.allow_failed (the warning is
    printed here and logged by every instance when it starts)."""
    bundle = Path(bundle).resolve()
    opened = Bundle.open(bundle, verify=False)  # the model verifies every file when it loads
    facts = bundle_facts(opened)
    if warning := require(opened, opts.allow_failed):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if opts.kind not in KINDS:
        raise UserError(f"unknown instance kind {opts.kind!r}; choose cpu or gpu")
    if opts.instances < 1:
        raise UserError(f"--instances must be at least 1, got {opts.instances}")
    if opts.gpus and opts.kind != "gpu":
        raise UserError("--gpus applies to --kind gpu only")
    if opts.backend == "trt" and opts.kind != "gpu":
        raise UserError("--backend trt runs on a GPU: use --kind gpu")
    if opts.backend == "trt" and (opts.providers or opts.prepack):
        raise UserError("--providers and --prepack apply to --backend ort only")
    providers = "auto" if opts.backend == "trt" else opts.providers or ("cuda" if opts.kind == "gpu" else "cpu")
    out = Path(out)
    write_atomic(out / MODEL / "config.pbtxt", _model_config(bundle, facts, opts, providers))
    write_atomic(out / MODEL / "1" / "model.py", _SHIM.format(cls="HealthGPTModel"))
    write_atomic(out / SELFTEST / "config.pbtxt", _SELFTEST_CONFIG.format(instances=_instances(1, opts.kind, ())))
    write_atomic(out / SELFTEST / "1" / "model.py", _SHIM.format(cls="SelfTestModel"))
    return out


def _instances(count: int, kind: str, gpus: tuple[int, ...]) -> str:
    where = f" gpus: [ {', '.join(map(str, gpus))} ]" if gpus else ""
    return f"instance_group [ {{ count: {count} kind: KIND_{kind.upper()}{where} }} ]"


def _model_config(bundle: Path, facts: BundleFacts, opts: Options, providers: str) -> str:
    params = {"bundle": str(bundle), "backend": opts.backend, "providers": providers,
              "prepack": "" if opts.backend == "trt" else "true" if opts.prepack else "false",
              "allow_failed_verification": "true" if opts.allow_failed else "false"}
    param_text = ",\n".join(f'  {{ key: "{k}" value {{ string_value: "{_escape(v)}" }} }}' for k, v in params.items())
    return _MODEL_CONFIG.format(tasks=", ".join(facts.tasks), image_tokens=facts.image_tokens,
                                instances=_instances(opts.instances, opts.kind, opts.gpus), params=param_text)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


_SHIM = """\
# Written by `python -m runtime triton`: the model is the runtime's own (runtime/frontends/serving/model.py).
from runtime.frontends.serving.model import {cls} as TritonPythonModel  # noqa: F401
"""

# Scalars are dims [1]; every input but the prompt is optional (defaults as in `python -m runtime ask/generate`).
# Integer inputs are INT64: a JSON value past int32 would otherwise wrap silently (2**32 + 3 -> 3).
_MODEL_CONFIG = """\
# Written by `python -m runtime triton`. Tasks in the bundle: {tasks}. One request at a time per instance;
# scale with instance_group count (CPU slots or per GPU) and more servers.
name: "healthgpt"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "task" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "image_base64" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "frame" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "window" data_type: TYPE_FP32 dims: [ 2 ] optional: true }},
  {{ name: "max_new_tokens" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_k" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "constrain_image_tokens" data_type: TYPE_BOOL dims: [ 1 ] optional: true }},
  {{ name: "history" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "token_id" data_type: TYPE_INT32 dims: [ 1 ] }},
  {{ name: "image_png" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "image_png_base64" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "indices" data_type: TYPE_INT32 dims: [ {image_tokens} ] }}
]
{instances}
parameters [
{params}
]
"""

_SELFTEST_CONFIG = """\
# Written by `python -m runtime triton`: returns 2 * each input, so a client can check tensors cross intact.
name: "healthgpt_selftest"
backend: "python"
max_batch_size: 0
input [
  {{ name: "ints" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "floats" data_type: TYPE_FP32 dims: [ -1 ] }}
]
output [
  {{ name: "ints" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "floats" data_type: TYPE_FP32 dims: [ -1 ] }}
]
{instances}
"""
