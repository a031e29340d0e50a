"""Conversations (issue 23): follow-ups on the kept KV cache equal the reference's LLaVA loop, run the decoder on
their new rows only, refuse a context overflow by turn; the image prefix cache is keyed and bounded; threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN, IMAGE_TOKEN_INDEX
from runtime.core.backend import OrtBackend
from runtime.core.bundle import Bundle
from runtime.core.conversation import Cancelled, _common, expand, image_rows
from runtime.core.image import load_image
from runtime.core.kvcache import KVCache
from runtime.core.pipeline import Pipeline
from runtime.core.prefixes import Prefix, PrefixCache

TURNS = ("What does this scan show?", "Is there anything abnormal?  Answer in 2 sentences.")
STEPS = 24


@pytest.fixture(scope="module")
def m3_pipe(m3_bundle):
    return Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))


@pytest.fixture(scope="module")
def scans():
    from pydicom.data import get_testdata_file

    return [load_image(get_testdata_file(name, download=False)) for name in ("CT_small.dcm", "MR_small.dcm")]


def count_runs(pipe: Pipeline, task: str, monkeypatch) -> list[tuple[str, dict]]:
    """Every graph run of `task` from now on: (graph, feeds)."""
    calls: list[tuple[str, dict]] = []
    graphs = pipe.task(task)
    for name in ("vision", "embed", "decoder"):
        graph = getattr(graphs, name)
        real = graph.run
        monkeypatch.setattr(graph, "run",
                            lambda feeds, name=name, real=real: calls.append((name, feeds)) or real(feeds))
    return calls


# --- parity with the reference ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["m3", "l14"])
def test_two_turns_equal_the_reference_where_the_answer_does_not_retokenize(variant, request, scans):
    ref = request.getfixturevalue(f"{variant}_com")
    pipe = Pipeline(Bundle.open(request.getfixturevalue(f"{variant}_bundle")), OrtBackend("cpu", threads=1))
    want = ref.conversation(scans[0], TURNS, STEPS)
    conv = pipe.conversation(scans[0])
    first = conv.ask(TURNS[0], STEPS)
    ids = conv.check(TURNS[1])
    second = conv.ask(TURNS[1], STEPS)
    assert ids == expand(want[1][0], image_rows(pipe, COM))  # turn 2's prompt: the reference tokenizer's rendering
    assert [list(first.tokens), list(second.tokens)] == [t for _, t in want]
    assert len(first.tokens) == len(second.tokens) == STEPS  # no early stop: every step compared
    # the subtlety: turn 1's generated ids are not what its answer text tokenizes to inside turn 2's prompt
    turn1 = expand(want[0][0], image_rows(pipe, COM))
    assert ids[len(turn1):len(turn1) + STEPS] != list(first.tokens)
    assert second.answer == ref.tokenizer.decode(want[1][1], skip_special_tokens=True)


def test_a_follow_up_runs_the_decoder_once_on_its_new_rows(m3_pipe, scans, monkeypatch):
    conv = m3_pipe.conversation(scans[0])
    ids = conv.check(TURNS[0])
    first = conv.ask(TURNS[0], 8)
    held = (ids + list(first.tokens))[:conv.cache.length]  # what the cache holds after turn 1
    ids = conv.check(TURNS[1])
    calls = count_runs(m3_pipe, "com", monkeypatch)
    second = conv.ask(TURNS[1], 8)
    keep = _common(held, ids)
    assert keep > ids.index(IMAGE_TOKEN_INDEX) + image_rows(m3_pipe, COM)  # the image and turn 1 reused
    assert [name for name, _ in calls if name != "embed"] == ["decoder"] * len(second.tokens)  # no vision
    prefill = calls[1][1]  # embed of the new rows, then the decoder on them
    assert prefill["inputs_embeds"].shape[1] == len(ids) - keep and int(prefill["past_length"][0]) == keep
    assert calls[0][1]["input_ids"].tolist() == [ids[keep:]]


def test_a_context_overflow_names_the_turn_and_the_limit(m3_pipe, scans, monkeypatch):
    conv = m3_pipe.conversation(scans[0])
    conv.ask(TURNS[0], 4)
    calls = count_runs(m3_pipe, "com", monkeypatch)
    with pytest.raises(UserError, match=r"context would reach \d+ tokens; this bundle holds at most 2048 at turn 2 "
                                        r"of this conversation \(start a new one to go on\): a \d+-token prompt"):
        conv.ask(" ".join(["word"] * 1500), 4)
    assert calls == [] and len(conv.turns) == 1
    assert conv.ask(TURNS[1], 4).tokens  # the conversation goes on


def test_a_cancelled_turn_is_dropped_and_the_next_equals_an_uncancelled_one(m3_pipe, scans):
    alone = m3_pipe.conversation(scans[1])
    want = [alone.ask(q, 8).tokens for q in TURNS]
    conv = m3_pipe.conversation(scans[1])
    conv.ask(TURNS[0], 8)
    ids: list[int] = []
    with pytest.raises(Cancelled, match="after 3 tokens"):
        conv.ask("A question given up on", 8, cancel=lambda: len(ids) >= 3, on_text=lambda _, i: ids.append(i))
    assert len(ids) == 3 and None not in ids and len(conv.turns) == 1
    assert conv.ask(TURNS[1], 8).tokens == want[1]


def test_a_released_conversation_goes_on_from_its_turns(m3_pipe, scans, monkeypatch):
    alone = m3_pipe.conversation(scans[0])
    want = [alone.ask(q, 8).tokens for q in TURNS]
    conv = m3_pipe.conversation(scans[0])
    conv.ask(TURNS[0], 8)
    conv.release()
    assert conv.cache is None
    calls = count_runs(m3_pipe, "com", monkeypatch)
    assert conv.ask(TURNS[1], 8).tokens == want[1]
    assert "vision" not in [name for name, _ in calls]  # the image rows from the prefix cache, turn 1 prefilled


def test_a_first_turn_interrupted_after_its_image_rows_starts_over(m3_bundle, scans, monkeypatch):
    pipe = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))
    want = pipe.conversation(scans[1]).ask(TURNS[0], 6).tokens
    pipe.prefixes = PrefixCache(max_mb=64)  # forgotten: the image rows are computed again

    def interrupted(self, length):
        raise KeyboardInterrupt

    conv = pipe.conversation(scans[1])
    with monkeypatch.context() as m:
        m.setattr(KVCache, "copy_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            conv.ask(TURNS[0], 6)
    assert conv.cache.length > 0  # the image rows were prefilled, never recorded
    assert conv.ask(TURNS[0], 6).tokens == want


# --- the image prefix cache ---------------------------------------------------------------------------------------

def test_a_new_conversation_on_a_seen_image_skips_the_vision_graph_and_its_prefill(m3_bundle, scans, monkeypatch):
    pipe = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))
    want = pipe.conversation(scans[0]).ask(TURNS[0], 8)
    assert len(pipe.prefixes) == 1
    calls = count_runs(pipe, "com", monkeypatch)
    again = pipe.conversation(scans[0]).ask(TURNS[0], 8)
    assert again.tokens == want.tokens
    assert "vision" not in [name for name, _ in calls]
    first = next(feeds for name, feeds in calls if name == "decoder")
    ids = pipe.conversation(scans[0]).check(TURNS[0])
    assert int(first["past_length"][0]) == ids.index(IMAGE_TOKEN_INDEX) + ids.count(IMAGE_TOKEN_INDEX)  # after them


def vision_runs(pipe: Pipeline, task, image, monkeypatch) -> int:
    calls = count_runs(pipe, task.name, monkeypatch)
    pipe.conversation(image, task).ask("Reconstruct the image." if task.makes_images else TURNS[0], 2)
    monkeypatch.undo()
    return [name for name, _ in calls].count("vision")


def test_the_prefix_cache_never_serves_another_frame_window_task_or_bundle(m3_bundle, l14_bundle, ct_small, tmp_path,
                                                                           monkeypatch):
    pipe = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))
    ramp = np.arange(40 * 30 * 3, dtype=np.uint32).reshape(30, 40, 3) % 251  # not one flat colour (refused)
    frames = [Image.fromarray(x.astype(np.uint8)) for x in (ramp, 250 - ramp)]
    frames[0].save(tmp_path / "two.tif", save_all=True, append_images=frames[1:])
    for image in (load_image(tmp_path / "two.tif", frame=0), load_image(ct_small)):
        assert vision_runs(pipe, COM, image, monkeypatch) == 1
        assert vision_runs(pipe, COM, image, monkeypatch) == 0  # seen
    assert vision_runs(pipe, COM, load_image(tmp_path / "two.tif", frame=1), monkeypatch) == 1
    assert vision_runs(pipe, COM, load_image(ct_small, window=(40, 400)), monkeypatch) == 1
    assert vision_runs(pipe, GEN, load_image(ct_small), monkeypatch) == 1  # another task: its own experts
    other = Pipeline(Bundle.open(l14_bundle), OrtBackend("cpu", threads=1))
    other.prefixes = pipe.prefixes  # one cache under two bundles: still never shared
    assert vision_runs(other, COM, load_image(ct_small), monkeypatch) == 1
    assert len(pipe.prefixes) == 6


def test_the_prefix_cache_is_bounded_least_recently_used_out():
    rows = lambda mb: {"past_key_0": np.zeros(mb * 2**20, np.uint8)}  # noqa: E731
    cache = PrefixCache(max_mb=3)
    for key in "abc":
        cache.put(key, Prefix((1,), rows(1)))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", Prefix((1,), rows(1)))
    assert cache.get("b") is None and all(cache.get(k) for k in "acd") and cache.nbytes == 3 * 2**20
    cache.put("e", Prefix((1,), rows(4)))  # larger than the bound: not kept, nothing dropped for it
    assert cache.get("e") is None and len(cache) == 3
    assert PrefixCache(max_mb=0).put("a", Prefix((1,), rows(1))) is None


# --- threads ------------------------------------------------------------------------------------------------------

def test_four_threads_of_two_conversations_equal_the_conversations_alone(m3_bundle, scans):
    pipe = Pipeline(Bundle.open(m3_bundle), OrtBackend("cpu", threads=1))
    plans = [(scans[k % 2], [f"Question {k}.{i}: what is at the centre?" for i in range(2)]) for k in range(8)]

    def run(plan) -> list[tuple[int, ...]]:
        conv = pipe.conversation(plan[0])
        return [conv.ask(q, 6).tokens for q in plan[1]]

    alone = [run(p) for p in plans]
    got: dict[int, list] = {}

    def worker(k: int) -> None:
        got[2 * k], got[2 * k + 1] = run(plans[2 * k]), run(plans[2 * k + 1])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(8)] == alone
