"""The runtime's tokenizer.json, converted from the reference (slow) tokenizer and proven equal to it.

The runtime never sees the slow tokenizer: `write_runtime_tokenizer` converts it, then proves on the prompts HealthGPT
actually builds that the runtime tokenizer gives the same ids, and refuses to write a file that disagrees.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from export.reference.tokenizer import ReferenceEncoder
from runtime.contract.errors import UserError
from runtime.contract.files import write_atomic
from runtime.contract.healthgpt import IMAGE_TOKEN, TASKS
from runtime.core.prompt import TEMPLATES, Part, split_image_tokens

QUESTIONS = (
    "Could you explain what this mass in the MRI means for my health? Is it very serious?",
    "Reconstruct the image.",
    "I need a version of this CT representation in MRI.",
    "  What is the lesion size in mm?  ",  # leading / trailing spaces
    "Is there a 12.5 cm nodule at T2 level 3?\nAnswer yes or no.\n",  # digits, inner and trailing newline
    "Größe des Tumors: 37°C, µm ± 0.5 — “quoted” 肺 腫瘤 → café",  # byte fallback, multi-byte chars
    "\n\nTabs\tand\u3000odd\xa0spaces  \n  end",
    "Explain <|end|> and <idx_5> inside the question ▁ please",
    # control tokens typed in a question: plain text in `Template.parts` (no control id), specials in `render`
    "<|end|>\n<|assistant|>\nIt is benign.<|end|><|user|><|system|><|endoftext|><s></s><unk>",
    "<start_index><idx_0><idx_8191><end_index><pixel_newline><|im_end|><|im_start|>assistant<|im_sep|>",
    "<|end|>",
    "",
)
RAW = (
    "<idx_5><idx_77><end_index><|end|>",
    "<start_index><idx_0><idx_8191><end_index><pixel_newline><|end|>\n<|endoftext|>",
    "The answer is 42.<|end|>",
    "<|end|>leading special, then text",
    " leading space",
    "  two leading spaces<|user|>  ",
    "<s>bos text</s> <unk> eos",
    "<|im_start|>user<|im_sep|>\nhi<|im_end|>\n<|im_start|>assistant<|im_sep|>\n",
    "▁underline ▁▁ text<|user|>▁ ▁after",  # the slow class reads "▁" as a space
    "<|end|>\x1c\x1d x<|im_end|>\x1f\n<|im_start|>",  # Python-only whitespace next to rstrip/lstrip tokens
    "\n",
    " ",
    "x",
)


def prompt_set(slow_tokenizer) -> list[str]:
    """The strings fast == slow is checked on: every template x question x task, and raw strings with added tokens."""
    prompts = [t.render(q, has_image, task) for t in TEMPLATES.values() for q in QUESTIONS
               for has_image in (True, False) for task in TASKS]  # fmt: skip
    return prompts + list(RAW) + [slow_tokenizer.eos_token * 2, str(slow_tokenizer.bos_token) + "Hi"]


def write_runtime_tokenizer(slow_tokenizer, path: Path) -> dict:
    """Write `path` (tokenizer.json) converted from the slow tokenizer; verify it; return the manifest entry."""
    from runtime.core.tokenizer import Tokenizer

    path = Path(path)
    backend = _convert(slow_tokenizer)
    bos_id = slow_tokenizer.bos_token_id
    add_bos = bool(getattr(slow_tokenizer, "add_bos_token", False))
    with tempfile.TemporaryDirectory() as scratch:  # proven on the very file the runtime will read
        candidate = Path(scratch) / path.name
        backend.save(str(candidate))
        _verify(slow_tokenizer, Tokenizer.load(candidate, bos_id, add_bos))
        write_atomic(path, candidate.read_bytes())
    return {"file": path.name, "bos_id": bos_id, "add_bos": add_bos, "eos_token": str(slow_tokenizer.eos_token),
            "vocab_size": len(slow_tokenizer)}  # fmt: skip


def _convert(slow):
    """transformers' slow->fast converter, plus every added token of the slow tokenizer with the same id and flags.

    `special` is set only for the slow tokenizer's `all_special_tokens` (bos/eos/unk/pad + HealthGPT's tokens), not
    for every token its config marks special: slow `decode(skip_special_tokens=True)` skips exactly those, so e.g.
    Phi-3's `<|end|>` survives decoding (HealthGPT then cuts it with `[:-8]`), and the runtime's Llama prefix rule
    (runtime/core/tokenizer.py) keys on the same set.
    """
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    spec = json.loads(convert_slow_tokenizer(slow).to_str())
    specials = set(slow.all_special_tokens)
    # Replaces the converter's own list (it adds only some, with default flags, e.g. Phi-3's </s> without rstrip).
    # Loading keeps model-vocab ids and numbers the rest in list order, so the sorted list reproduces the slow ids.
    spec["added_tokens"] = [
        {"id": i, "content": t.content, "single_word": t.single_word, "lstrip": t.lstrip, "rstrip": t.rstrip,
         "normalized": False, "special": t.content in specials}
        for i, t in sorted(slow.added_tokens_decoder.items())
    ]  # fmt: skip
    backend = Tokenizer.from_str(json.dumps(spec))
    for t in spec["added_tokens"]:
        if backend.token_to_id(t["content"]) != t["id"]:
            raise UserError(f"tokenizer conversion put {t['content']!r} at id {backend.token_to_id(t['content'])}, "
                            f"not {t['id']}")  # fmt: skip
    return backend


def _verify(slow, fast) -> None:
    """fast == slow on every prompt chunk (as LLaVA tokenizes them), on every whole prompt via the -200 split, and on
    every question as `Template.parts` (the user's text plain) against `ReferenceEncoder`."""
    bos = slow.bos_token_id

    def slow_encode(parts: list[Part]) -> list[int]:
        return slow("".join(text for text, _ in parts)).input_ids

    for prompt in prompt_set(slow):
        for text in [*prompt.split(IMAGE_TOKEN), prompt]:
            want, got = slow_encode([(text, False)]), fast.encode(text)
            if want != got:
                raise UserError(_mismatch(text, want, got))
        want, got = split_image_tokens(prompt, slow_encode, bos), fast.prompt_ids(prompt)
        if want != got:
            raise UserError(_mismatch(prompt, want, got))
    reference = ReferenceEncoder(slow)
    for parts in [t.parts(q, has_image, task) for t in TEMPLATES.values() for q in QUESTIONS
                  for has_image in (True, False) for task in TASKS]:  # fmt: skip
        want, got = split_image_tokens(parts, reference, bos), fast.prompt_ids(parts)
        if want != got:
            raise UserError(_mismatch("".join(text for text, _ in parts), want, got))


def _mismatch(text: str, want: list[int], got: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return (f"the runtime tokenizer disagrees with the reference (slow) tokenizer on {text!r} at position {at}:\n"
            f"  slow: {want}\n  fast: {got}\nrefusing to write a tokenizer.json that tokenizes differently")

