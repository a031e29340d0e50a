"""Serving on Triton: the real tritonserver 2.51 (nvidia-pytriton 0.7.0) from the serving venv, on the tiny M3 bundle.

Expected answers come from Pipeline in this process (numpy 2); the server runs the same bundle under numpy 1.26.
gRPC clients run in the serving venv (tests/serving_client.py: tritonclient is not installable next to this venv's
protobuf 7); HTTP clients run here with the standard library. The first run creates .venv-serving (about a minute
with a warm pip cache); the tests skip, saying why, only if its packages cannot be installed.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from serving_http import b64, http_generate, http_stream, metrics, pixels
from serving_support import FOLLOW_UP, INSTRUCTION, QUESTION, ROOT, drive, expected, free_ports, grpc, scan

from runtime.contract.errors import UserError
from runtime.frontends.serving import repository
from runtime.frontends.serving.server import SELFTEST_FLOATS, SELFTEST_INTS, Server


@pytest.fixture(scope="module")
def repo(m3_bundle, tmp_path_factory):
    return repository.write(m3_bundle, tmp_path_factory.mktemp("repo"), repository.Options(instances=2))


@pytest.fixture(scope="module")
def server(serving_env, repo):
    s = Server(serving_env, repo, free_ports()).start()
    try:
        s.wait_ready(300)
        yield s
    finally:
        s.stop()
        assert not s.group_alive()


# ---------------------------------------------------------------- tensors cross the stub intact

def test_numpy_and_float_round_trip(serving_env, server):
    server.selftest()  # HTTP/JSON: raises unless doubled exactly
    floats = np.array([*SELFTEST_FLOATS, np.finfo(np.float32).tiny, -0.0, 1.5e-45], np.float32)
    got = drive(serving_env, {"url": server.grpc, "selftest": [SELFTEST_INTS, floats.tolist()]})
    assert got["ints"] == [2, 4, 6, 8]
    assert np.array_equal(np.array(got["float_bits"], np.uint32).view(np.float32), floats * 2)


# ---------------------------------------------------------------- same answers as the Pipeline

def test_grpc_stream_is_token_for_token_pipeline_ask(serving_env, server, serving_pipe):
    cases = [{"prompt": QUESTION, **scan("ct"), "max_new_tokens": 24},
             {"prompt": "Describe the image.", **scan("rgb2"), "max_new_tokens": 24},
             {"prompt": QUESTION, **scan("ct_window"), "max_new_tokens": 24},
             {"prompt": "Any findings?", "max_new_tokens": 24},  # no image
             {"prompt": QUESTION, **scan("mr"), "max_new_tokens": 24, "temperature": 0.8, "top_k": 50,
              "top_p": 0.9, "seed": 7}]
    for case, got in zip(cases, grpc(serving_env, server, cases)):
        want = expected(serving_pipe, **case)
        assert got.get("ids") == want["ids"] and got["text"] == want["text"], case
        assert len(want["ids"]) == 24


def test_http_generate_stream_is_token_for_token_pipeline_ask(server, serving_pipe):
    want = expected(serving_pipe, **scan("mr"), max_new_tokens=20)
    events = http_stream(server, {"prompt": QUESTION, "image_base64": b64(scan("mr")["image"]),
                                  "max_new_tokens": 20})
    assert [e["token_id"] for e in events if "token_id" in e] == want["ids"]
    assert "".join(e["text"] for e in events) == want["text"]


def test_a_follow_up_over_grpc_and_http_equals_the_in_process_conversation(serving_env, server, serving_pipe):
    from runtime.core.image import load_image

    conversation = serving_pipe.conversation(load_image(scan("ct")["image"]))
    first, second = (conversation.ask(q, 16) for q in (QUESTION, FOLLOW_UP))
    (got,) = grpc(serving_env, server, [{"prompt": FOLLOW_UP, **scan("ct"), "max_new_tokens": 16,
                                         "history": [[QUESTION, first.answer]]}])
    assert got["ids"] == list(second.tokens) and got["text"] == second.answer and len(second.tokens) == 16
    events = http_stream(server, {"prompt": FOLLOW_UP, "image_base64": b64(scan("ct")["image"]), "max_new_tokens": 16,
                                  "history": json.dumps([{"question": QUESTION, "answer": first.answer}])})
    assert [e["token_id"] for e in events if "token_id" in e] == list(second.tokens)
    assert "".join(e["text"] for e in events) == second.answer


def test_generate_returns_pipeline_indices_and_png(serving_env, server, serving_pipe):
    case = {"task": "gen", "prompt": INSTRUCTION, **scan("ct"), "constrain_image_tokens": True}
    want = expected(serving_pipe, **case)
    (got,) = grpc(serving_env, server, [case])
    assert got["indices"] == want["indices"] and len(got["indices"]) == 1024
    assert np.array_equal(pixels(got["png"]), want["pixels"])
    # JSON clients get the PNG back in base64
    status, body = http_generate(server, {"task": "gen", "prompt": INSTRUCTION, "constrain_image_tokens": True,
                                          "image_base64": b64(scan("ct")["image"])})
    assert status == 200 and body["indices"] == want["indices"]
    assert np.array_equal(pixels(body["image_png_base64"]), want["pixels"])


# ---------------------------------------------------------------- load

def test_load_8_clients_25_requests_each(serving_env, server, serving_pipe):
    # Every 20th request is an image (about 1 s each here, 10 in all); the rest answers of 16 tokens, on 4 real scans.
    coms = ["ct", "mr", "rgb2", "ct_window"]
    cases = [{"task": "gen", "prompt": INSTRUCTION, **scan("ct"), "constrain_image_tokens": True} if i % 20 == 0 else
             {"prompt": QUESTION, **scan(coms[i % 4]), "max_new_tokens": 16} for i in range(200)]
    # Each of the 2 instances serves both tasks first (its first image loads the VQGAN and grows ORT's arenas: +70
    # MiB once, measured), so what follows measures a warm server: the RSS after the first 50 load requests and
    # after the last 50 (here flat within 1% from request 70 on).
    warm = grpc(serving_env, server, [cases[0], cases[0], cases[1], cases[1]], concurrency=2)
    assert not any("error" in w for w in warm), warm
    wants = {}
    before = metrics(server)
    run = drive(serving_env, {"url": server.grpc, "requests": cases, "concurrency": 8, "rss_pid": server.process.pid,
                              "rss_after": [50, 200], "timeout": 120}, timeout=400)
    after = metrics(server)
    for case, got in zip(cases, run["results"]):
        key = json.dumps(case, sort_keys=True)
        if key not in wants:
            wants[key] = expected(serving_pipe, **case)
        want = wants[key]
        assert "error" not in got, got
        if case.get("task") == "gen":
            assert got["indices"] == want["indices"] and np.array_equal(pixels(got["png"]), want["pixels"])
        else:
            assert got["ids"] == want["ids"] and got["text"] == want["text"]
    rss_first, rss_last = run["rss"]["50"], run["rss"]["200"]
    assert abs(rss_last - rss_first) <= 0.10 * rss_first, (rss_first, rss_last)
    ok = 'nv_inference_request_success{model="healthgpt",version="1"}'
    assert after[ok] - before[ok] == 200
    failed = [k for k in after if k.startswith('nv_inference_request_failure{model="healthgpt"')]
    assert failed and all(after[k] == before.get(k, 0) for k in failed)
    print(f"load: 200 requests in {run['seconds']:.1f} s, server RSS {rss_first / 2**20:.0f} -> "
          f"{rss_last / 2**20:.0f} MiB")


# ---------------------------------------------------------------- faults

def cancellations(server) -> int:
    return server.log.read_text(errors="replace").count("cancelled by the client")


def test_client_disconnects_mid_stream(serving_env, server, serving_pipe):
    before = cancellations(server)
    long = {"prompt": QUESTION, **scan("ct"), "max_new_tokens": 2000}
    (got,) = grpc(serving_env, server, [{**long, "cancel_after": 3}])
    assert got == {"cancelled_after": 3}
    assert len(http_stream(server, {"prompt": QUESTION, "image_base64": b64(scan("ct")["image"]),
                                    "max_new_tokens": 2000}, stop_after=3)) == 3
    deadline = time.monotonic() + 30
    while cancellations(server) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancellations(server) == before + 2  # both decode loops stopped at the next token
    case = {"prompt": QUESTION, **scan("mr"), "max_new_tokens": 8}
    assert grpc(serving_env, server, [case])[0]["ids"] == expected(serving_pipe, **case)["ids"]


@pytest.mark.parametrize("body, message", [
    ({"prompt": "q", "task": "segment"}, "unknown task 'segment'"),
    ({"prompt": "q", "image_base64": "not base64!"}, "not valid base64"),
    ({"prompt": "q", "image_base64": base64.b64encode(b"hello").decode()}, "not an image file"),
    ({"prompt": "q" * 5000, "max_new_tokens": 2}, "holds at most 2048"),
    ({"prompt": "q", "max_new_tokens": 0}, "from 1 to 2147483647, got 0"),
    ({"prompt": "q", "max_new_tokens": 2**32 + 3}, "from 1 to 2147483647, got 4294967299"),  # not wrapped to 3
    ({"prompt": "q", "max_new_tokens": -5}, "got -5"),
    ({"prompt": "q", "top_p": 0.0, "temperature": 1.0}, "sampling"),
    ({"prompt": "q", "frame": 2}, "need an image"),
    ({"prompt": "q", "history": '[{"question": 1}]'}, "history: need a JSON list"),
    ({"prompt": "q", "task": "gen", "history": "[]"}, "history: a gen request answers with an image"),
    ({"prompt": "q", "history": json.dumps([{"question": "q", "answer": "a " * 3000}])},
     "at turn 2 of this conversation"),
    ({"task": "com"}, "prompt"),
    ({"prompt": "q", "max_new_tokens": "many"}, "Unable to parse"),  # Triton's own refusal (HTTP 500), before the model
])
def test_malformed_request_gets_error_and_instance_lives(server, body, message):
    status, reply = http_generate(server, body)
    assert status == (500 if message == "Unable to parse" else 400) and message in reply["error"], reply
    assert server.model_ready()


def test_infer_on_the_decoupled_model_is_501_as_the_readme_says(server):
    from urllib import error, request

    body = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["q"]}]}).encode()
    with pytest.raises(error.HTTPError) as e:
        request.urlopen(request.Request(f"{server.http}/v2/models/healthgpt/infer", body), timeout=60)
    assert e.value.code == 501 and "decoupled" in e.value.read().decode()
    assert "`/v2/models/healthgpt/infer` with HTTP 501" in (ROOT / "README.md").read_text()


def test_malformed_images_and_the_next_request(serving_env, server, serving_pipe):
    cases = [{"prompt": "q", "image": get_testdata_file("MR_truncated.dcm")},
             {"prompt": "q", "image": get_testdata_file("CT_small.dcm"), "frame": 5},
             {"task": "gen", "prompt": INSTRUCTION, **scan("ct"), "max_new_tokens": 3},  # too few image tokens
             {"prompt": QUESTION, **scan("ct"), "max_new_tokens": 6}]
    results = grpc(serving_env, server, cases)
    assert "truncated" in results[0]["error"] and "frame 5 is out of range" in results[1]["error"]
    assert "exactly 1024 image tokens are needed" in results[2]["error"]
    assert results[3]["ids"] == expected(serving_pipe, **cases[3])["ids"]


def test_sigkill_and_restart(serving_env, repo, serving_pipe):
    s = Server(serving_env, repo, free_ports(), log=repo / "killed.log").start()
    try:
        s.wait_ready(300)
        os.kill(s.process.pid, signal.SIGKILL)
        assert s.process.wait(30) == -signal.SIGKILL
        s.stop()  # ends the stubs the killed server left behind
        deadline = time.monotonic() + 20
        while s.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not s.group_alive()
        s.start().wait_ready(300)  # same repository, same ports
        cases = [{"prompt": QUESTION, **scan("ct"), "max_new_tokens": 8},
                 {"task": "gen", "prompt": INSTRUCTION, **scan("mr"), "constrain_image_tokens": True}]
        got = grpc(serving_env, s, cases)
        assert got[0]["ids"] == expected(serving_pipe, **cases[0])["ids"]
        assert got[1]["indices"] == expected(serving_pipe, **cases[1])["indices"]
    finally:
        s.stop()


# ---------------------------------------------------------------- the repository

# ---------------------------------------------------------------- the workstation app against the server

def test_app_remote_model_gives_the_pipelines_answers(server, serving_pipe):
    """`python -m runtime app --server URL`: the app's model on the server answers as the local Pipeline does."""
    import threading

    from runtime.core.image import load_image
    from runtime.frontends.app.remote import RemoteModel

    model = RemoteModel(server.http)
    info = model.describe()
    assert info["variant"] == "m3" and info["tasks"] == ["com", "gen"]  # the bundle is on this machine
    assert info["manifest_sha256"] == serving_pipe.bundle.digest
    image = load_image(scan("ct")["image"])
    texts = []
    conversation = model.conversation(image)
    answer = model.ask(conversation, QUESTION, 20, lambda text, _: texts.append(text), threading.Event()).answer
    assert answer == "".join(texts) == serving_pipe.ask(image, QUESTION, max_new_tokens=20)
    local = serving_pipe.conversation(image)
    want = [local.ask(q, 20) for q in (QUESTION, FOLLOW_UP)][1]  # the app's --server mode continues conversations
    assert model.ask(conversation, FOLLOW_UP, 20, lambda *_: None, threading.Event()).tokens == want.tokens
    progress = []
    pixels = model.generate(image, INSTRUCTION, True, lambda *p: progress.append(p), threading.Event())
    assert np.array_equal(pixels, serving_pipe.generate_image(image, INSTRUCTION, constrain_image_tokens=True))
    assert progress[-1] == (1024, 0, 1024)
    with pytest.raises(UserError, match="image_base64|image|question|prompt") as e:
        model.ask(model.conversation(image), "<image> forged", 4, lambda *a: None, threading.Event())
    assert "Traceback" not in str(e.value)
