"""The reference tokenizer: the slow HF tokenizer exactly as HealthGPT builds it (base files + its 8195 tokens), and its
encoding of a prompt whose user text is plain text (ReferenceEncoder)."""

from __future__ import annotations

from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import HEALTHGPT_TOKENS, START_INDEX
from runtime.core.prompt import Part
from runtime.core.tokenizer import UNDERLINE, added_pattern, encode_parts


def load_reference_tokenizer(base_dir: Path):
    """`AutoTokenizer.from_pretrained(base, padding_side="right", use_fast=False)` + HealthGPT's added tokens.

    Like `add_special_tokens_and_resize_model`, the 8195 tokens are added as additional special tokens unless the
    tokenizer already has additional special tokens; then they must already be in the vocabulary.
    """
    from transformers import AutoTokenizer

    base_dir = Path(base_dir)
    try:
        tok = AutoTokenizer.from_pretrained(base_dir, padding_side="right", use_fast=False, local_files_only=True)
    except Exception as e:  # missing dir, missing/corrupt tokenizer.model, vocab.json, config, ...
        raise UserError(f"cannot load the base tokenizer from {base_dir}: {type(e).__name__}: {e}") from e
    if not tok.additional_special_tokens:
        _add_special_tokens_fast(tok, list(HEALTHGPT_TOKENS))
    elif START_INDEX not in tok.get_vocab():
        raise UserError(
            f"the tokenizer in {base_dir} already has additional special tokens "
            f"({tok.additional_special_tokens[:3]}...), so HealthGPT adds none, but {START_INDEX} is not in its "
            "vocabulary: use the unmodified base-model tokenizer files"
        )
    return tok


def _add_special_tokens_fast(tok, tokens: list[str]) -> None:
    """`tok.add_special_tokens({"additional_special_tokens": tokens})`, with identical results, in 0.1 s not 40 s.

    transformers' slow `_add_tokens` recomputes `all_special_tokens` (a list of all 8195+ tokens) once per added
    token. The list cannot change inside that loop (the tokens are registered as additional specials before it), so a
    per-call cache of it is exact; the class swap is undone before returning.
    """
    cls = type(tok)
    cache: list = []

    def all_special_tokens(self):
        if not cache:
            cache.append(frozenset(cls.all_special_tokens.fget(self)))
        return cache[0]

    tok.__class__ = type(cls.__name__, (cls,), {"all_special_tokens": property(all_special_tokens)})
    try:
        tok.add_special_tokens({"additional_special_tokens": tokens})
    finally:
        tok.__class__ = cls


class ReferenceEncoder:
    """The slow tokenizer's `tokenizer(text).input_ids` over `Template.parts`: its own `tokenize`, run by the shared
    `encode_parts` over its own per-text tokenization (`_tokenize`, the method each slow class defines for the text
    between added tokens), so that a user's part is plain text. On template text alone it gives `tokenizer(text)`'s
    ids exactly (tests/test_tokenizer.py)."""

    def __init__(self, slow):
        self._slow = slow
        self._added = {t.content: (i, t.lstrip, t.rstrip) for i, t in slow.added_tokens_decoder.items()}
        self._pattern = added_pattern(self._added)
        llama_prefix = getattr(slow, "legacy", True) is False and getattr(slow, "add_prefix_space", True)
        self._underline = slow.convert_tokens_to_ids(UNDERLINE) if llama_prefix else None

    def __call__(self, parts: list[Part]) -> list[int]:
        slow = self._slow
        ids = encode_parts(parts, self._pattern, self._added,
                           lambda text: slow.convert_tokens_to_ids(slow._tokenize(text)), self._underline,
                           frozenset(slow.all_special_ids))
        return slow.build_inputs_with_special_tokens(ids)
