"""What keeps other origins out: the CSP and friends on every response, and the header every state-changing request
from the app's own page carries."""

from __future__ import annotations

from starlette.requests import Request

from runtime.contract.errors import UserError

# Everything from this origin, nothing from any other; images also from the blob: URLs the page makes.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# A custom header makes any cross-origin POST a CORS preflight, which this app never grants: another web page open
# in the clinician's browser cannot start requests here.
CSRF_HEADER = "x-healthgpt-app"


def guard(request: Request) -> None:
    if request.headers.get(CSRF_HEADER) != "1":
        raise UserError(f"refused: requests to this app come from its own page (missing {CSRF_HEADER} header)")


class SecurityHeaders:
    """Adds the CSP and friends to every response (pure ASGI, so streamed responses pass through untouched)."""

    HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)
