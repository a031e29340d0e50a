"""The app's streamed requests (jobs): each runs its model work in a worker thread, and its events (tokens, progress,
the end) reach the page through an asyncio queue as server-sent events, `data: {json}` lines. Stop sets the job's
event, which the model checks at every token; a page that goes away stops its job the same way. Each job writes
one audit line when it ends (server.py says what a record holds).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable

from starlette.responses import StreamingResponse

from runtime.contract.errors import UserError
from runtime.core.conversation import Cancelled


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"  # ASCII: an unpaired surrogate cannot break the stream


def rates(started: float, stamps: list[float]) -> dict:
    """Time to first token (from the request) and tokens/s after it, as `python -m runtime ask` reports them."""
    if not stamps:
        return {}
    out = {"ttft": round(stamps[0] - started, 4)}
    if len(stamps) > 1:
        out["rate"] = round((len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9), 2)
    return out


class Job:
    def __init__(self):
        self.id = uuid.uuid4().hex
        self.stop = threading.Event()


Emit = Callable[[dict], None]
Work = Callable[[Job, Emit, float], dict]  # work(job, emit, started) -> the fields of the job's last event


class Jobs:
    """The jobs streaming now, by id. write_audit(record) writes a job's audit line: None, or why it could not."""

    def __init__(self, write_audit: Callable[[dict], str | None]):
        self.running: dict[str, Job] = {}
        self._write_audit = write_audit

    def stop(self, job_id: str) -> None:
        job = self.running.get(job_id)
        if job is not None:  # else already finished: nothing to stop
            job.stop.set()

    def stop_all(self) -> None:
        for job in list(self.running.values()):
            job.stop.set()

    def stream(self, record: dict, work: Work, start: dict | None = None) -> StreamingResponse:
        """Run work(job, emit, started) in a thread and stream its events (`start` in the first); one audit line per
        request."""
        job = Job()
        self.running[job.id] = job
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(event: dict | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        def run() -> None:
            started = time.perf_counter()
            end = _end(record, lambda: work(job, emit, started))
            record["duration_s"] = round(time.perf_counter() - started, 4)
            if failed := self._write_audit(record):
                end = {"type": "error", "error": f"the audit log could not be written ({failed}); this request is "
                                                 "not recorded, tell your administrator"}
            emit({**end, "duration": record["duration_s"]})
            emit(None)

        async def events():
            try:
                yield _sse({"type": "start", "job": job.id, **(start or {})})
                loop.run_in_executor(None, run)
                while (event := await queue.get()) is not None:
                    yield _sse(event)
            finally:  # finished, or the page went away: either way nothing more to decode
                job.stop.set()
                self.running.pop(job.id, None)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _end(record: dict, work: Callable[[], dict]) -> dict:
    """Run the work; its last event, with the outcome in the audit record ("done", "stopped" or "error")."""
    try:
        end = {"type": "done", **work()}
        record["status"] = "done"
    except Cancelled:
        end = {"type": "stopped"}
        record["status"] = "stopped"
    except UserError as e:
        end = {"type": "error", "error": str(e)}
        record.update(status="error", error=str(e))
    except Exception:  # a bug, not the user's doing: full detail in the server log, one line on the page
        traceback.print_exc(file=sys.stderr)
        end = {"type": "error", "error": "internal error: the server log has the details"}
        record.update(status="error", error="internal error")
    return end
