"""`build.py verify`'s conversation check (kept apart from the single-turn end-to-end checks in verify.py, as its
own `conversation` list in parity.json): a 2-turn COM conversation, the runtime's session against the reference's
LLaVA loop. Turn 2's prompt ids (the runtime's rendering of its own first answer) must equal the reference
tokenizer's, and the greedy tokens of both turns must agree as far as the bundle's token bound asks (fp32: all).
Where a quantized bundle's first answer differs (as its bound allows), turn 2 is reported as not compared."""

from __future__ import annotations

from dataclasses import dataclass

from export.reference.model import HealthGPT
from runtime.contract.healthgpt import TASKS
from runtime.core.conversation import expand, image_rows
from runtime.core.pipeline import Pipeline

TURNS = ("What does this scan show?", "Is there anything abnormal?  Answer in 2 sentences.")


@dataclass
class ConversationExpectations:
    task: str
    prompt_ids: list[list[int]]  # per turn, the image as one -200 slot
    tokens: list[list[int]]  # per turn, greedy


def expect_conversation(ref: HealthGPT, image, steps: int) -> ConversationExpectations | None:
    """The reference's conversation (COM only: a GEN turn answers with an image, not text to follow up on)."""
    if TASKS[ref.task].makes_images:
        return None
    turns = ref.conversation(image, TURNS, steps)
    return ConversationExpectations(ref.task, [ids for ids, _ in turns], [tokens for _, tokens in turns])


def conversation_checks(want: ConversationExpectations, pipe: Pipeline, image, steps: int, bounds: dict) -> list[dict]:
    task = TASKS[want.task]
    conv = pipe.conversation(image, task)
    first = conv.ask(TURNS[0], steps)
    ids = conv.check(TURNS[1])
    second = conv.ask(TURNS[1], steps)
    turns = [token_check(f"{want.task} conversation turn {turn} greedy tokens", expected, list(got),
                         bounds["token_agreement"])
             for turn, (got, expected) in enumerate(zip((first.tokens, second.tokens), want.tokens), 1)]
    if list(first.tokens) != want.tokens[0]:  # within a quantized bundle's token bound: turn 2 cannot be compared
        return [turns[0], {"check": f"{want.task} conversation turn 2 (not compared)", "ok": True,
                           "detail": "the first answers differ (judged above), so turn 2's prompts hold different "
                                     "answers"}]
    same_ids = ids == expand(want.prompt_ids[1], image_rows(pipe, task))
    return [{"check": f"{want.task} conversation turn 2 tokenization", "ok": same_ids,
             "detail": f"{len(ids)} prompt rows, {'identical to' if same_ids else 'DIFFERENT from'} the reference's"},
            *turns]


def token_check(check: str, expected: list[int], got: list[int], bound: float | None) -> dict:
    """Greedy agreement: the identical leading tokens over the longer of the two streams."""
    same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    agreement = same / max(len(expected), len(got), 1)
    return bounded(check, agreement, bound, f"first {same} of {len(expected)} tokens identical (agreement "
                                             f"{agreement:.3f}, ")


def bounded(check: str, value: float, need: float | None, detail: str) -> dict:
    """A figure against its lower bound; a scheme with no bound (None) reports it, named as not judged."""
    if need is None:
        return {"check": f"{check} (measured, no limit)", "ok": True, "detail": f"{detail}no limit for this scheme)"}
    return {"check": check, "ok": value >= need, "detail": f"{detail}required {need})"}
