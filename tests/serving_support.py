"""What the serving tests share: the scans they send, the expected answers from an in-process Pipeline, the gRPC
driver run in the serving venv (tests/serving_client.py), free ports."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from pydicom.data import get_testdata_file

from runtime.core.prompt import vq_indices
from runtime.core.sampling import Sampler
from runtime.frontends.serving.server import Ports

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("serving_client.py")
QUESTION = "What does this scan show?"
INSTRUCTION = "Reconstruct the image."
FOLLOW_UP = "Is it serious?"
SCANS = {"ct": ("CT_small.dcm", None, None), "mr": ("MR_small.dcm", None, None),
         "rgb2": ("SC_rgb_rle_2frame.dcm", 1, None), "ct_window": ("CT_small.dcm", None, (40.0, 400.0))}


def scan(name: str) -> dict:
    file, frame, window = SCANS[name]
    return {"image": get_testdata_file(file), "frame": frame, "window": window}


def free_ports() -> Ports:
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = Ports(*(s.getsockname()[1] for s in socks))
    for s in socks:
        s.close()
    return ports


def expected(pipe, task="com", prompt=QUESTION, image=None, frame=None, window=None, max_new_tokens=None,
             temperature=0.0, top_k=0, top_p=1.0, seed=None, constrain_image_tokens=False):
    from runtime.core.image import load_image

    pil = load_image(image, frame=frame, window=window) if image else None
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if task == "com":
        ids: list[int] = []
        text = pipe.ask(pil, prompt, max_new_tokens=max_new_tokens or 1024, on_token=ids.append, sampler=sampler)
        return {"text": text, "ids": ids}
    t = pipe.bundle.manifest.tokens
    tokens = pipe.image_tokens(pil, prompt, max_new_tokens=max_new_tokens or 1100, sampler=sampler,
                               constrain_image_tokens=constrain_image_tokens)
    return {"indices": vq_indices(tokens, t.idx_0, t.vq_codes, t.image_tokens),
            "pixels": pipe.decode_image(tokens)}


def drive(env, job: dict, timeout: float = 240) -> dict:
    done = subprocess.run([str(env.python), str(DRIVER)], input=json.dumps(job), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env.environ())
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def grpc(env, server, requests, **job) -> list[dict]:
    return drive(env, {"url": server.grpc, "requests": requests, **job})["results"]
