"""HealthGPT's conversation templates and LLaVA's `<image>` split, verbatim (reference: llava/conversation.py, mm_utils.py).

Shared by the PyTorch reference (with the slow HF tokenizer) and the runtime (with tokenizer.json), so both build
prompts with the same code and only the tokenizer differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from runtime.errors import UserError
from runtime.healthgpt import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, IMAGE_TOKENS, TASKS, VQ_CODES


@dataclass(frozen=True)
class Template:
    """LLaVA's `MPT` separator style: system + sep, then role + message + sep per turn, then the open role."""

    system: str
    user: str
    assistant: str
    sep: str

    def render(self, question: str, has_image: bool, task: str) -> str:
        message = f"{IMAGE_TOKEN}\n{question}" if has_image else question
        prompt = f"{self.system}{self.sep}{self.user}{message}{self.sep}{self.assistant}"
        return prompt + TASKS[task].prompt_suffix


TEMPLATES = {
    "phi3_instruct": Template(
        system="<|system|>\nYou are a helpful AI assistant.",
        user="\n<|user|>\n",
        assistant="\n<|assistant|>\n",
        sep="<|end|>",
    ),
    # Copied by HealthGPT from the phi-4 model card; reproduced verbatim for parity.
    "phi4_instruct": Template(
        system="<|im_start|>system<|im_sep|>\nYou are a medieval knight and must provide explanations to modern people.",
        user="\n<|im_start|>user<|im_sep|>\n",
        assistant="\n<|im_start|>assistant<|im_sep|>\n",
        sep="<|im_end|>",
    ),
}


def split_image_tokens(prompt: str, encode: Callable[[str], Sequence[int]], bos_id: int | None) -> list[int]:
    """LLaVA's `tokenizer_image_token`: encode each `<image>`-separated chunk on its own, join with one -200.

    When the first chunk starts with BOS, one BOS is kept and the first id of every later chunk is dropped
    (the reference drops it whether or not it is a BOS).
    """
    chunks = [list(encode(chunk)) for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and bos_id is not None and chunks[0][0] == bos_id else 0
    ids = chunks[0][:1] if offset else []
    for i, chunk in enumerate(chunks):
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
