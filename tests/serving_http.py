"""The tests' HTTP client of the Triton server (standard library): Triton's generate endpoints and /metrics."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image


def http_stream(server, body: dict, stop_after: int | None = None) -> list[dict]:
    """POST /generate_stream; the SSE events' JSON, or (stop_after) the first events, then hang up."""
    req = urllib.request.Request(f"{server.http}/v2/models/healthgpt/generate_stream", json.dumps(body).encode())
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
                if stop_after and len(events) == stop_after:
                    break
    return events


def http_generate(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"{server.http}/v2/models/healthgpt/generate", json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def b64(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^(nv_inference_\w+\{[^}]*\}) (\S+)$', text, re.M)}


def pixels(png_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_b64))))
