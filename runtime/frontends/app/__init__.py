"""The clinician's workstation app: `python -m runtime app --bundle B` serves one offline page on 127.0.0.1.

A small Starlette (ASGI) app under uvicorn with one static HTML/JS/CSS page shipped in this package, rather than
Gradio: Gradio's page loads fonts and assets from remote hosts and reports usage analytics unless told not to, and it
does not give us control of the windowing path. Here every byte the browser loads comes from this package, a
Content-Security-Policy forbids any other host, and the server does all image decoding and windowing, so the pixels
shown are the pixels the model gets (runtime.core.image: one decode per frame, `Frame.render(window)` for both).

Modules: model.py (what the page talks to: ask with streamed text, generate with progress, describe; the local
Pipeline implementation), scans.py (uploaded files, decoded once), audit.py (the JSON-lines audit log),
server.py (routes, streaming, `serve` for the CLI), security.py (the CSP), static/
(the page). Torch-free, like all of runtime/.
"""
