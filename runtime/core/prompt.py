"""HealthGPT's conversation templates and LLaVA's `<image>` split, verbatim (llava/conversation.py, mm_utils.py).

Shared by the PyTorch reference (with the slow HF tokenizer) and the runtime (with tokenizer.json), so both build
prompts with the same code and only the tokenizer differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, IMAGE_TOKENS, TASKS, VQ_CODES

Part = tuple[str, bool]  # (text, typed by the user): user text is plain text, never control tokens


@dataclass(frozen=True)
class Template:
    """LLaVA's `MPT` separator style: system + sep, then role + message + sep per turn, then the open role."""

    system: str
    user: str
    assistant: str
    sep: str

    def parts(self, question: str, has_image: bool, task: str, history: Sequence[tuple[str, str]] = ()) -> list[Part]:
        """The prompt as template text around the user's questions: only the template may hold control tokens.

        history: the earlier (question, answer) turns, rendered again as LLaVA's conversation does each turn (the
        image in the first user turn only). An answer enters as the text the user saw, stripped; it is template text
        there (the reference tokenizes it with the rest), except one holding `<image>`, kept as plain text rather
        than read as a second image slot the reference could not fill.
        """
        check_question(question)
        parts: list[Part] = [(f"{self.system}{self.sep}{self.user}" + (f"{IMAGE_TOKEN}\n" if has_image else ""), False)]
        for asked, answer in history:
            answer = answer.strip()
            parts += [(asked, True), (f"{self.sep}{self.assistant}", False), (answer, IMAGE_TOKEN in answer),
                      (f"{self.sep}{self.user}", False)]
        return parts + [(question, True), (f"{self.sep}{self.assistant}{TASKS[task].prompt_suffix}", False)]

    def render(self, question: str, has_image: bool, task: str) -> str:
        """The prompt as the reference's one string (where the question's control tokens would count)."""
        return "".join(text for text, _ in self.parts(question, has_image, task))


TEMPLATES = {
    "phi3_instruct": Template(
        system="<|system|>\nYou are a helpful AI assistant.",
        user="\n<|user|>\n",
        assistant="\n<|assistant|>\n",
        sep="<|end|>",
    ),
    # Copied by HealthGPT from the phi-4 model card; reproduced verbatim for parity.
    "phi4_instruct": Template(
        system="<|im_start|>system<|im_sep|>\nYou are a medieval knight and must provide explanations to modern "
               "people.",
        user="\n<|im_start|>user<|im_sep|>\n",
        assistant="\n<|im_start|>assistant<|im_sep|>\n",
        sep="<|im_end|>",
    ),
}


def check_question(question: str) -> None:
    """Refuse a question no prompt can hold (callers check it before loading anything)."""
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable argv bytes arrive as surrogate escapes (U+DC80..U+DCFF)
        char = question[e.start]
        what = f"byte 0x{ord(char) - 0xDC00:02X}" if 0xDC80 <= ord(char) <= 0xDCFF else f"U+{ord(char):04X}"
        raise UserError(f"the question is not valid UTF-8 text ({what} at character {e.start}): "
                        "retype it in a UTF-8 terminal or convert it to UTF-8") from None
    if IMAGE_TOKEN in question:
        # Refused rather than kept literal: it is what a LLaVA-style prompt ("<image>\n...") pasted as a question
        # holds, and the model never saw the literal text; the template already places the one image.
        raise UserError(f"the question contains {IMAGE_TOKEN}: the image is placed by the prompt template, "
                        f"so remove {IMAGE_TOKEN} from the question")


def split_image_tokens(prompt: str | Sequence[Part], encode: Callable[[list[Part]], Sequence[int]],
                       bos_id: int | None) -> list[int]:
    """LLaVA's `tokenizer_image_token`: encode each `<image>`-separated chunk on its own, join with one -200.

    `prompt` is one template string or `Template.parts`; only template text is split at `<image>`. When the first
    chunk starts with BOS, one BOS is kept and the first id of every later chunk is dropped (the reference drops it
    whether or not it is a BOS).
    """
    chunks: list[list[Part]] = [[]]
    for text, user in [(prompt, False)] if isinstance(prompt, str) else prompt:
        pieces = [text] if user else text.split(IMAGE_TOKEN)
        chunks[-1].append((pieces[0], user))
        chunks += [[(piece, user)] for piece in pieces[1:]]
    encoded = [list(encode(chunk)) for chunk in chunks]
    offset = 1 if encoded and encoded[0] and bos_id is not None and encoded[0][0] == bos_id else 0
    ids = encoded[0][:1] if offset else []
    for i, chunk in enumerate(encoded):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids


def vq_indices(token_ids: Sequence[int], idx0_id: int, codes: int = VQ_CODES, count: int = IMAGE_TOKENS) -> list[int]:
    """Token-level version of the reference's `decode(...)[:-8]` + regex: every `<idx_N>` token, in order, as N.

    Exactly `count` are required (one 32x32 latent grid); anything else is an error that says what came out.
    """
    indices = [t - idx0_id for t in token_ids if idx0_id <= t < idx0_id + codes]
    if len(indices) != count:
        others = len(token_ids) - len(indices)
        raise UserError(f"generation produced {len(indices)} image tokens and {others} other tokens; exactly {count} "
                         f"image tokens are needed for one image (try --constrain-image-tokens)")
    return indices
