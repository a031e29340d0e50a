"""The CLI's answers on the terminal: one turn streamed to stdout, its timing to stderr (`ask`, and each turn of
`chat`), and `chat`'s loop of turns, one question per line of standard input."""

from __future__ import annotations

import sys
import time

from runtime.contract.errors import UserError
from runtime.core.providers import quiet_ort


def info(message: str) -> None:
    print(f"[I] {message}", file=sys.stderr, flush=True)


def say(conversation, question: str, a, sampler) -> None:
    """One turn, streamed to stdout; its timing to stderr."""
    out = sys.stdout  # the real one: quiet_ort swaps sys.stdout to swallow ONNX Runtime's fallback messages
    stamps: list[float] = []

    def on_text(text: str, token: int | None) -> None:
        if token is not None:
            stamps.append(time.perf_counter())
        if text:
            out.write(text)
            out.flush()

    start = time.perf_counter()
    try:
        with quiet_ort(a.verbose):
            conversation.ask(question, a.max_new_tokens, sampler, on_text=on_text)
    except KeyboardInterrupt:
        out.write("\n")  # the answer so far stays on its own line
        raise
    end = time.perf_counter()
    out.write("\n")
    out.flush()
    if not stamps:
        info(f"no tokens: the model stopped at once ({end - start:.3f} s)")
    else:
        n = len(stamps)
        rate = f"{(n - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s" if n > 1 else "1 token"
        info(f"time to first token {stamps[0] - start:.3f} s, {rate} after it ({n} tokens in {end - start:.2f} s)")


def chat(conversation, a, sampler) -> int:
    """`chat`: questions from standard input, one per line, each a turn of `conversation`. At a terminal: a prompt, a
    mistake or Ctrl-C during an answer ends only that turn; from a pipe, the first error ends the chat (exit 2)."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        question = line.strip()
        if not question:
            continue
        try:
            say(conversation, question, a, sampler)
        except (UserError, KeyboardInterrupt) as e:
            if not interactive:
                raise
            print(f"error: {e}" if isinstance(e, UserError) else "[I] stopped", file=sys.stderr, flush=True)
