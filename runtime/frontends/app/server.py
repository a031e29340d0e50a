"""The app's HTTP side: the page, uploads, windowed renders, streamed requests (server-sent events), the audit log.

Every model request runs in a worker thread as a job (jobs.py), its events streamed to the page; Stop, or a page
that goes away, stops it at its next token. Questions are turns of a conversation the app keeps per page (the
page sends its id back; another image, frame or window starts a new one); a stopped turn is left out of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import socket
import sys
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN
from runtime.core.prompt import check_question
from runtime.frontends.app.audit import AuditLog
from runtime.frontends.app.jobs import Emit, Job, Jobs, rates
from runtime.frontends.app.model import Model, Session
from runtime.frontends.app.scans import Scan, Scans
from runtime.frontends.app.security import SecurityHeaders

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 1 << 30  # bytes; a large multi-frame study still fits, a runaway upload does not
MAX_JSON = 1 << 20
KEEP_OUTPUTS = 16  # generated PNGs held for the page to fetch
KEEP_CONVERSATIONS = 32  # the pages' conversations, least recently asked out
KEEP_CACHES = 2  # ... of which the most recent keep their KV cache (each up to ~1.6 GB at full size)
# A custom header makes any cross-origin POST a CORS preflight, which this app never grants: another web page open
# in the clinician's browser cannot start requests here.
CSRF_HEADER = "x-healthgpt-app"


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class App:
    def __init__(self, model: Model, audit: AuditLog):
        self.model, self.audit = model, audit
        self.scans = Scans()
        self.jobs = Jobs(self._write_audit)
        self.outputs: OrderedDict[str, bytes] = OrderedDict()
        self._outputs_lock = threading.Lock()
        self.conversations: OrderedDict[str, tuple[tuple, Session]] = OrderedDict()
        self._conversations_lock = threading.Lock()

    # ---- request helpers ----

    @staticmethod
    def _guard(request: Request) -> None:
        if request.headers.get(CSRF_HEADER) != "1":
            raise UserError(f"refused: requests to this app come from its own page (missing {CSRF_HEADER} header)")

    @staticmethod
    async def _json(request: Request) -> dict:
        body = await request.body()
        if len(body) > MAX_JSON:
            raise UserError(f"request too large ({len(body)} bytes; the limit is {MAX_JSON})")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise UserError("request body is not JSON") from None
        if not isinstance(data, dict):
            raise UserError("request body must be a JSON object")
        return data

    @staticmethod
    def _window(value) -> tuple[float, float] | None:
        if value is None:
            return None
        try:
            center, width = (float(v) for v in value)
        except (TypeError, ValueError):
            raise UserError(f"window {value!r}: need [center, width]") from None
        if not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise UserError(f"window ({center:g}, {width:g}): need a finite center and a width > 0")
        return center, width

    def _image(self, data: dict):
        """The scan, frame, window and rendered image a request names (the scan may be null for a question)."""
        if data.get("scan") is None:
            return None, None, None, None
        scan = self.scans.get(str(data["scan"]))
        frame = data.get("frame", 0)
        if isinstance(frame, bool) or not isinstance(frame, int):
            raise UserError(f"frame {frame!r}: need an integer")
        image, window = scan.render(frame, self._window(data.get("window")))
        return scan, frame, window, image

    def _conversation(self, wanted, key: tuple, image) -> Session:
        """The page's conversation when it is about this image (scan, frame and window); else a new one."""
        with self._conversations_lock:
            kept = self.conversations.get(wanted) if isinstance(wanted, str) else None
            if kept is not None and kept[0] == key:
                self.conversations.move_to_end(wanted)
            else:
                kept = (key, self.model.conversation(image))
                self.conversations[kept[1].id] = kept
            while len(self.conversations) > KEEP_CONVERSATIONS:
                self.conversations.popitem(last=False)
            for _, older in list(self.conversations.values())[:-KEEP_CACHES]:
                older.release()
            return kept[1]

    # ---- routes ----

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def info(self, request: Request) -> Response:
        return JSONResponse({**self.model.describe(), "audit_log": str(self.audit.path)})

    async def upload(self, request: Request) -> Response:
        self._guard(request)
        name = unquote(request.headers.get("x-filename", "")) or "upload"
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_UPLOAD:
                raise UserError(f"{name}: file too large (over {MAX_UPLOAD >> 20} MiB)")
            chunks.append(chunk)
        if not size:
            raise UserError(f"{name}: the file is empty")
        scan = await asyncio.to_thread(Scan, b"".join(chunks), name)  # decoding is CPU work: off the event loop
        self.scans.add(scan)
        return JSONResponse(scan.describe())

    async def render(self, request: Request) -> Response:
        scan = self.scans.get(request.path_params["scan"])
        q = request.query_params
        try:
            frame = int(q.get("frame", "0"))
        except ValueError:
            raise UserError(f"frame {q.get('frame')!r}: need an integer") from None
        if ("center" in q) != ("width" in q):
            raise UserError("a display window needs both center and width")
        window = self._window((q["center"], q["width"])) if "center" in q else None
        image, window = await asyncio.to_thread(scan.render, frame, window)
        png = io.BytesIO()
        image.save(png, format="PNG")
        headers = {"Cache-Control": "no-store"}
        if window is not None:
            headers["X-Window"] = f"{window[0]:.6g} {window[1]:.6g}"
        return Response(png.getvalue(), media_type="image/png", headers=headers)

    async def output(self, request: Request) -> Response:
        with self._outputs_lock:
            png = self.outputs.get(request.path_params["sha"])
        if png is None:
            return _error("no such generated image (the app keeps the last few): generate it again", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def stop(self, request: Request) -> Response:
        self._guard(request)
        self.jobs.stop(request.path_params["job"])
        return Response(status_code=204)

    async def ask(self, request: Request) -> Response:
        return await self._audited(COM.name, request, self._ask)

    async def generate(self, request: Request) -> Response:
        return await self._audited(GEN.name, request, self._generate)

    async def _audited(self, task: str, request: Request, prepare) -> Response:
        """Check the request (prepare(data) -> (audit record, work)) and stream its work. A request refused before
        it starts (not from the page, not JSON, a bad question, frame, window or budget, an unknown scan) gets its
        400 and one audit line too, status "refused"."""
        data: dict = {}
        try:
            self._guard(request)
            data = await self._json(request)
            record, work, *start = await prepare(data)  # (record, work[, the stream's first event])
        except UserError as e:
            prompt = data.get("question" if task == COM.name else "instruction")
            frame = data.get("frame")
            record = self._record(task, None, frame if isinstance(frame, int) else None, None,
                                  prompt if isinstance(prompt, str) else None, status="refused", error=str(e))
            self._write_audit(record)
            raise
        return self.jobs.stream(record, work, *start)

    def _write_audit(self, record: dict) -> str | None:
        """Write one audit line; the reason when it could not be (also printed to the server log)."""
        try:
            self.audit.write(record)
        except OSError as e:
            print(f"error: audit log {self.audit.path}: {e}", file=sys.stderr, flush=True)
            return str(e)
        return None

    async def _ask(self, data: dict):
        question = data.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError("type a question first")
        check_question(question)
        limit = self.model.max_context or math.inf  # unknown for a server's bundle: the server checks it
        max_new = data.get("max_new_tokens", COM.max_new_tokens)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= limit:
            raise UserError(f"max new tokens {max_new!r}: need an integer from 1 to {limit} (the bundle's context)")
        scan, frame, window, image = await asyncio.to_thread(self._image, data)
        conversation = self._conversation(data.get("conversation"), (scan and scan.sha256, frame, window), image)
        turn = {"conversation": conversation.id, "turn": len(conversation.turns) + 1}
        record = self._record(COM.name, scan, frame, window, question, **turn)
        texts: list[str] = []

        def work(job: Job, emit: Emit, started: float) -> dict:
            stamps: list[float] = []

            def on_text(piece: str, token: int | None) -> None:
                if token is not None:
                    stamps.append(time.perf_counter())
                texts.append(piece)
                emit({"type": "text", "text": piece, "tokens": len(stamps), **rates(started, stamps)})

            try:
                self.model.ask(conversation, question, max_new, on_text, job.stop)
            finally:
                record.update(answer="".join(texts), tokens=len(stamps))
            return {"tokens": len(stamps), **rates(started, stamps)}

        return record, work, turn

    async def _generate(self, data: dict):
        if GEN.name not in self.model.tasks:
            raise UserError("this bundle has no image generation (gen) task")
        instruction = data.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError("type an instruction first, e.g. \"Reconstruct the image.\"")
        check_question(instruction)
        if data.get("scan") is None:
            raise UserError("open an image first: generation starts from the image on screen")
        scan, frame, window, image = await asyncio.to_thread(self._image, data)
        constrain = bool(data.get("constrain", True))
        record = self._record(GEN.name, scan, frame, window, instruction, constrain_image_tokens=constrain)

        def work(job: Job, emit: Emit, started: float) -> dict:
            def on_progress(done: int, other: int, need: int) -> None:
                emit({"type": "progress", "done": done, "other": other, "need": need})

            pixels = self.model.generate(image, instruction, constrain, on_progress, job.stop)
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            sha = hashlib.sha256(png.getvalue()).hexdigest()
            with self._outputs_lock:
                self.outputs[sha] = png.getvalue()
                while len(self.outputs) > KEEP_OUTPUTS:
                    self.outputs.popitem(last=False)
            record["output_sha256"] = sha
            return {"url": f"/api/outputs/{sha}.png", "sha256": sha}

        return record, work

    # ---- the audit record ----

    def _record(self, task: str, scan: Scan | None, frame, window, prompt: str | None, **extra) -> dict:
        return {"time": _now(), "task": task, "input_sha256": scan.sha256 if scan else None,
                "frame": frame, "window": list(window) if window else None, "prompt": prompt, **extra,
                "bundle_manifest_sha256": self.model.manifest_sha256}

    def stop_all(self) -> None:
        self.jobs.stop_all()


async def _user_error(request: Request, exc: UserError) -> Response:
    return _error(str(exc))


def create_app(model: Model, audit: AuditLog, allowed_hosts: list[str]) -> Starlette:
    app = App(model, audit)

    @asynccontextmanager
    async def lifespan(_):
        yield
        app.stop_all()  # shutting down: end running decodes at their next token

    routes = [Route("/", app.index), Route("/api/info", app.info),
              Route("/api/scans", app.upload, methods=["POST"]),
              Route("/api/scans/{scan}/image", app.render),
              Route("/api/ask", app.ask, methods=["POST"]), Route("/api/generate", app.generate, methods=["POST"]),
              Route("/api/jobs/{job}/stop", app.stop, methods=["POST"]),
              Route("/api/outputs/{sha}.png", app.output),
              Mount("/static", StaticFiles(directory=STATIC))]
    # Starlette types a handler as taking any Exception; one for a subclass is what its docs show.
    starlette = Starlette(routes=routes, lifespan=lifespan,
                          exception_handlers={UserError: _user_error},  # type: ignore[dict-item]
                          middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts),
                                      Middleware(SecurityHeaders)])
    starlette.state.app = app
    return starlette


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear error (and port 0 picks a free one)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --port or --host)") \
            from None
    return sock


def serve(bundle: Path | None, server_url: str | None, host: str, port: int, audit_path: Path, backend: str,
          providers: str, quiet, allow_failed: bool = False) -> int:
    """`python -m runtime app`: open the model, listen, serve until Ctrl-C. allow_failed: run a bundle that failed
    its verification (said on every start and in the page's banner)."""
    from runtime.frontends.app.model import LocalModel
    from runtime.frontends.app.remote import RemoteModel

    audit = AuditLog(audit_path)
    sock = bind(host, port)
    model: Model
    with quiet():
        if server_url:
            model = RemoteModel(server_url)
        else:
            assert bundle is not None  # the CLI takes --bundle or --server
            model = LocalModel.open(bundle, backend, providers, allow_failed)
    port = sock.getsockname()[1]
    local = host in ("127.0.0.1", "localhost", "::1")
    allowed = ["127.0.0.1", "localhost", "[::1]", host] if local else ["*"]
    info = model.describe()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"[I] {info['variant']} {info['precision']} on {', '.join(info['providers'])}; parity "
          f"{info['parity']['status']}; audit log {audit.path}", file=sys.stderr, flush=True)
    if info["verification_warning"]:
        print(f"warning: {info['verification_warning']}", file=sys.stderr, flush=True)
    if not local:
        print(f"warning: listening on {host}: the app has no login; anyone who can reach this port can use it",
              file=sys.stderr, flush=True)
    print(f"[I] app at {url} (Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(create_app(model, audit, allowed), log_level="warning", access_log=False, http="h11",
                            ws="none", lifespan="on", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
