"""The app's conversation pane in the real browser (fixtures and helpers: test_app.py): a follow-up streamed as
turn 2, generating in between, a new conversation, the audit lines per turn."""

from __future__ import annotations

import pytest

pytest.importorskip("playwright.sync_api", reason="playwright is not installed (scripts/setup.sh does it)")
from test_app import (  # noqa: E402,F401
    INSTRUCTION,
    QUESTION,
    ask,
    browser,
    only_own_host,
    open_file,
    page,
    pydicom_file,
    reference,
    screenshot,
    served,
    wait_status,
    wait_until,
)

from runtime.core.image import load_image  # noqa: E402

FOLLOW_UP = "Is it serious?"


def test_a_conversation_in_the_page(page, served, reference):  # noqa: F811 (fixtures from test_app)
    """Ask, generate from the same image (the gen task), follow up: the follow-up streams as turn 2 of the same
    conversation, equal to the Pipeline's, with no vision run; a new conversation starts over. Audited per turn."""
    ct = pydicom_file("CT_small.dcm")
    open_file(page, ct)
    conversation = reference.conversation(load_image(ct))
    want = [conversation.ask(q, 12) for q in (QUESTION, FOLLOW_UP)]
    ask(page, QUESTION, 12)
    assert page.text_content("#answer") == want[0].answer
    page.fill("#instruction", INSTRUCTION)
    page.click("#generate")
    wait_status(page, "#generate-status", "done")
    served.pixel_values.clear()
    served.slow.set()  # slow enough to see the answer arrive in pieces
    try:
        ask(page, FOLLOW_UP, 12, wait_for="running")
        wait_until(page, "() => parseInt(document.getElementById('tokens').textContent) >= 2")
        assert want[1].answer.startswith(page.text_content("#answer"))
        wait_status(page, "#ask-status", "done")
    finally:
        served.slow.clear()
    assert page.text_content("#answer") == want[1].answer and served.pixel_values == []
    turns = page.eval_on_selector_all(".turn-q", "(qs) => qs.map((q) => [q.dataset.turn, q.textContent])")
    assert turns == [["1", QUESTION], ["2", FOLLOW_UP]]
    screenshot(page, "11-conversation")
    page.click("#new-conversation")
    assert page.eval_on_selector_all(".turn", "(ts) => ts.length") == 0
    ask(page, QUESTION, 12)
    assert page.text_content("#answer") == want[0].answer
    records = [r for r in served.audit() if r["task"] == "com"][-3:]
    assert [(r["prompt"], r["turn"], r["status"]) for r in records] == [(QUESTION, 1, "done"), (FOLLOW_UP, 2, "done"),
                                                                         (QUESTION, 1, "done")]
    assert records[0]["conversation"] == records[1]["conversation"] != records[2]["conversation"]
    assert records[1]["answer"] == want[1].answer and records[1]["tokens"] == len(want[1].tokens)
    only_own_host(page, served)


def test_the_app_keeps_the_kv_caches_of_its_latest_conversations_only(tmp_path):
    from runtime.frontends.app.audit import AuditLog
    from runtime.frontends.app.server import KEEP_CACHES, App

    class Session:
        def __init__(self):
            self.id, self.turns, self.released = str(id(self)), [], False

        def release(self):
            self.released = True

    class Model:
        def conversation(self, image):
            return Session()

    app = App(Model(), AuditLog(tmp_path / "audit.jsonl"))
    made = [app._conversation(None, (k, 0, None), None) for k in range(KEEP_CACHES + 2)]
    assert [c.released for c in made] == [True, True] + [False] * KEEP_CACHES
    assert app._conversation(made[-1].id, (KEEP_CACHES + 1, 0, None), None) is made[-1]  # the page's, continued
    assert app._conversation(made[-1].id, (KEEP_CACHES + 1, 1, None), None) not in made  # another frame: a new one
