"""Client side of tests/test_serving.py, run by the serving venv's Python (tritonclient is installed there; the
test venv's protobuf 7 rules it out there). Reads a JSON job on stdin, prints a JSON result on stdout.

job: {"url": "HOST:PORT", "concurrency": N, "requests": [{...serving.client.Request fields, "image": PATH,
      "history": [[question, answer], ...], "cancel_after": K}], "rss_pid": PID, "rss_after": [counts]}
or {"url": ..., "selftest": [ints, floats]}
"""

import base64
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from runtime.contract.errors import UserError
from runtime.core.conversation import Turn
from runtime.frontends.serving.client import Client, Request


def group_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (tritonserver and its python-backend stubs)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, StopIteration):
            pass
    return total


def one(client: Client, spec: dict) -> dict:
    spec = dict(spec)
    cancel_after = spec.pop("cancel_after", None)
    if spec.get("image") is not None:
        spec["image"] = Path(spec["image"]).read_bytes()
    if spec.get("window") is not None:
        spec["window"] = tuple(spec["window"])
    spec["history"] = tuple(Turn(q, a) for q, a in spec.get("history", ()))
    request = Request(**spec)
    start = time.perf_counter()
    try:
        if cancel_after is not None:
            n = 0
            for _ in client.stream(request):
                n += 1
                if n == cancel_after:
                    break  # leaving the stream cancels the request
            return {"cancelled_after": n}
        if request.task == "gen":
            png, indices = client.generate(request)
            return {"png": base64.b64encode(png).decode(), "indices": indices.tolist(),
                    "seconds": time.perf_counter() - start}
        stamps = []
        text, ids = client.ask(request, on_text=lambda t, _: stamps.append(time.perf_counter()))
        return {"text": text, "ids": ids, "seconds": time.perf_counter() - start,
                "first": (stamps[0] - start) if stamps else None}
    except UserError as e:
        return {"error": str(e)}


def main() -> None:
    job = json.load(sys.stdin)
    if "selftest" in job:
        import tritonclient.grpc as grpcclient

        ints, floats = np.array(job["selftest"][0], np.int64), np.array(job["selftest"][1], np.float32)
        inputs = [grpcclient.InferInput("ints", [len(ints)], "INT64"),
                  grpcclient.InferInput("floats", [len(floats)], "FP32")]
        inputs[0].set_data_from_numpy(ints)
        inputs[1].set_data_from_numpy(floats)
        result = grpcclient.InferenceServerClient(job["url"]).infer("healthgpt_selftest", inputs)
        # float32 bits as integers: the comparison on the test's side is exact
        print(json.dumps({"ints": result.as_numpy("ints").tolist(),
                          "float_bits": result.as_numpy("floats").view(np.uint32).tolist()}))
        return
    requests, results, rss = job["requests"], [None] * len(job["requests"]), {}
    lock, done, clients = threading.Lock(), [0], job.get("concurrency", 1)
    rss_after = set(job.get("rss_after", []))

    def worker(k: int) -> None:  # client k sends requests k, k + clients, ... one after the other
        with Client(job["url"], timeout=job.get("timeout", 120)) as client:
            for i in range(k, len(requests), clients):
                results[i] = one(client, requests[i])
                with lock:
                    done[0] += 1
                    if done[0] in rss_after:
                        rss[done[0]] = group_rss(job["rss_pid"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"results": results, "rss": rss, "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
