"""The runtime tokenizer: tokenizer.json (written and verified by export/compile/tokenizer.py) behind the slow HF
semantics.

Torch-free: only `tokenizers` and the standard library. `encode` returns what the reference's slow tokenizer returns
for `tokenizer(text).input_ids`; `decode` what its `decode` returns. `encode_parts` is the slow class's `tokenize`
itself, shared with the reference (export/reference/tokenizer.py runs it over the slow tokenizer's own pieces):
added tokens are split out of the text first, then each text between them is tokenized alone. That order is what lets
a user's question be plain text: added tokens are split out of the template's parts only, so `<|end|>` typed in a
question is five pieces of text, never the control id. Slow behaviours a tokenizer.json cannot express are reproduced
here (export/compile/tokenizer.py proves the encoding on the real prompts, tests/test_tokenizer.py the decoding):

- Llama with `legacy=False` (Phi-3): the slow class turns every "▁" into a space, prepends "▁" to the whole text,
  tokenizes, then drops a leading "▁" token only when the next token is one of `all_special_tokens`. So
  "<|system|>..." starts with a "▁" token ("<|system|>" is an added token but not in `all_special_tokens`).
- lstrip/rstrip of added tokens strip the neighbouring text with Python's str.strip, as the slow class does.
- Slow `decode` joins text runs and added tokens outside `all_special_tokens` (e.g. `<|end|>`, and HealthGPT's tokens
  when they are not skipped) with single spaces; HealthGPT's `[:-8]` relies on that " <|end|>".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from runtime.contract.errors import UserError
from runtime.contract.healthgpt import HEALTHGPT_TOKENS
from runtime.core.prompt import Part, split_image_tokens

UNDERLINE = "\u2581"  # SentencePiece's space
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece byte-fallback pieces


class Tokenizer:
    def __init__(self, backend, spec: dict, bos_id: int | None, add_bos: bool):
        self._tok = backend
        self.bos_id = bos_id
        self.add_bos = bool(add_bos)
        added = spec.get("added_tokens") or []
        if any(t["single_word"] for t in added):
            raise UserError("the bundle's tokenizer has single_word added tokens, whose slow-tokenizer rule this "
                            "runtime does not reproduce")
        # The export marks `special` exactly for the slow tokenizer's all_special_tokens.
        self.special_ids = frozenset(t["id"] for t in added if t["special"])
        # Slow decode's "legacy added tokens": added tokens outside all_special_tokens, plus the additional special
        # tokens past the model vocabulary (HealthGPT's); each stands alone, joined to its neighbours by a space.
        healthgpt = set(HEALTHGPT_TOKENS)
        self._alone_ids = frozenset(t["id"] for t in added if not t["special"] or t["content"] in healthgpt)
        self._underline_id = backend.token_to_id(UNDERLINE) if _metaspace_first(spec.get("pre_tokenizer")) else None
        self._added = {t["content"]: (t["id"], t["lstrip"], t["rstrip"]) for t in added}
        self._pattern: re.Pattern | None = None  # built on first need (~0.1 s for HealthGPT's 8195 tokens)
        self._plain = _plain_backend(spec)
        if self.add_bos and bos_id is None:
            raise UserError("the tokenizer manifest asks for a BOS token but gives no bos_id")

    @classmethod
    def load(cls, path: Path, bos_id: int | None, add_bos: bool) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            backend = Backend.from_str(text)
            spec = json.loads(text)
        except FileNotFoundError as e:
            raise UserError(f"tokenizer file not found: {path} (rebuild the bundle)") from e
        except Exception as e:  # bad JSON, not a tokenizers file, unreadable
            raise UserError(f"tokenizer file {path} is corrupt: {type(e).__name__}: {e} (rebuild the bundle)") from e
        return cls(backend, spec, bos_id, add_bos)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(self, text: str | Sequence[Part]) -> list[int]:
        """The slow tokenizer's `tokenizer(text).input_ids`: BOS (when add_bos) + ids, never EOS. For
        `Template.parts`, the user's parts are plain text: no added token is recognised in them."""
        if self._pattern is None:
            self._pattern = added_pattern(self._added)
        ids = encode_parts([(text, False)] if isinstance(text, str) else text, self._pattern, self._added,
                           lambda piece: self._plain.encode(piece, add_special_tokens=False).ids,
                           self._underline_id, self.special_ids)
        if self.add_bos:
            assert self.bos_id is not None  # __init__ refuses add_bos without one
            return [self.bos_id, *ids]
        return ids

    def prompt_ids(self, prompt: str | Sequence[Part]) -> list[int]:
        """LLaVA's tokenizer_image_token: chunks around `<image>` encoded separately, joined by one -200 slot."""
        return split_image_tokens(prompt, self.encode, self.bos_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The slow tokenizer's `decode(ids, skip_special_tokens)` (spaces_between_special_tokens, no clean-up)."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in self._alone_ids:
                if run:
                    text = self._decode_run(run)
                    parts += [text] if text else []  # an empty run adds no space, except at the end (below)
                    run = []
                parts.append(self._tok.id_to_token(i))
            else:
                run.append(i)
        if run:
            parts.append(self._decode_run(run))
        return " ".join(parts)

    def _decode_run(self, run: list[int]) -> str:
        if self._underline_id is None:
            return self._tok.decode(run, skip_special_tokens=False)
        # Slow LlamaTokenizer.convert_tokens_to_string, in Python: the converted decoder (ByteFallback) turns every
        # byte of an invalid UTF-8 run into U+FFFD, SentencePiece only the invalid bytes; and a special token first in
        # the run, followed by a non-special piece without "▁", gets a space after it.
        tokens = [self._tok.id_to_token(i) for i in run]
        if tokens[0].startswith(UNDERLINE):
            tokens[0] = tokens[0][1:]
        out: list[str] = []
        pieces: list[str] = []
        prev_special = False
        for k, (i, token) in enumerate(zip(run, tokens)):
            if i in self.special_ids:
                out += [_sp_decode(pieces), token]
                pieces, prev_special = [], True
            else:
                if prev_special and k == 1 and not token.startswith(UNDERLINE):
                    out.append(" ")
                pieces.append(token)
                prev_special = False
        out.append(_sp_decode(pieces))
        return "".join(out)


def _sp_decode(pieces: list[str]) -> str:
    """SentencePiece's decode of pieces: "▁" is a space, runs of <0xNN> pieces are UTF-8 bytes."""
    out: list[str] = []
    raw = bytearray()
    for p in pieces:
        if BYTE_PIECE.fullmatch(p):
            raw.append(int(p[3:5], 16))
            continue
        if raw:
            out.append(_utf8_per_byte(bytes(raw)))
            raw.clear()
        out.append(p.replace(UNDERLINE, " "))
    if raw:
        out.append(_utf8_per_byte(bytes(raw)))
    return "".join(out)


def _utf8_per_byte(raw: bytes) -> str:
    """UTF-8 with one U+FFFD per byte that is not part of a valid character (SentencePiece's rule)."""
    out, i = [], 0
    while i < len(raw):
        for n in (1, 2, 3, 4):
            try:
                out.append(raw[i : i + n].decode("utf-8"))
                i += n
                break
            except UnicodeDecodeError:
                continue
        else:
            out.append("\ufffd")
            i += 1
    return "".join(out)


class StreamDecoder:
    """Text as tokens arrive: each `push` returns the newly printable suffix; `flush` whatever is held back.

    Decodes the whole id list each time (about 1 ms a token at 1k tokens), so every leading-space and byte rule is the
    one `decode` applies. A trailing U+FFFD is held back: it is usually a UTF-8 character whose bytes are still
    arriving, and the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._printed = ""

    @property
    def text(self) -> str:
        return self._printed

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids, self._skip)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def flush(self) -> str:
        return self._emit(self._tok.decode(self._ids, self._skip))

    def _emit(self, text: str) -> str:
        if not text.startswith(self._printed):
            # A later token rewrote earlier text (never seen with these tokenizers); what is printed stays printed.
            common = len(_common_prefix(text, self._printed))
            text = self._printed + text[common:]
        new = text[len(self._printed) :]
        self._printed = text
        return new


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _metaspace_first(pre: dict | None) -> bool:
    """True for the converted Llama legacy=False pre-tokenizer (Metaspace, prepend only to the first split)."""
    if not pre:
        return False
    if pre.get("type") == "Sequence":
        return any(_metaspace_first(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first"


def _plain_backend(spec: dict):
    """The tokenizer without its added tokens and without Metaspace's own "▁" prefix: the model's ids for one text
    between added tokens (the prefix is the whole text's, added by `encode_parts`)."""
    from tokenizers import Tokenizer as Backend

    def never_prepend(pre):
        if pre and pre.get("type") == "Sequence":
            return {**pre, "pretokenizers": [never_prepend(p) for p in pre["pretokenizers"]]}
        return {**pre, "prepend_scheme": "never"} if pre and pre.get("type") == "Metaspace" else pre

    plain = {**spec, "added_tokens": [], "pre_tokenizer": never_prepend(spec.get("pre_tokenizer"))}
    return Backend.from_str(json.dumps(plain))


def added_pattern(contents) -> re.Pattern:
    """All added tokens, longest first: the slow tokenizer's trie match (leftmost, then longest)."""
    return re.compile("(" + ("|".join(map(re.escape, sorted(contents, key=len, reverse=True))) or "(?!)") + ")")


def encode_parts(parts: Sequence[Part], pattern: re.Pattern, added: Mapping[str, tuple[int, bool, bool]],
                 plain: Callable[[str], list[int]], underline: int | None = None,
                 special_ids: frozenset[int] = frozenset()) -> list[int]:
    """The slow tokenizer's `tokenize` + token ids (no BOS) over `parts`, with added tokens split out of template
    parts only: a user part is text, whatever it spells.

    added: content -> (id, lstrip, rstrip); plain: the ids of one text without added tokens; underline: the "▁" id
    for Llama legacy=False (see the module docstring), None for tokenizers without that prefix.
    """
    if underline is not None and any(text for text, _ in parts):
        parts = [(UNDERLINE, False), *((text.replace(UNDERLINE, " "), user) for text, user in parts)]
    flat = [""]  # text, added token, text, ..., text
    for text, user in parts:
        pieces = [text] if user else pattern.split(text)
        flat[-1] += pieces[0]
        flat += pieces[1:]
    for i in range(1, len(flat), 2):
        _, lstrip, rstrip = added[flat[i]]
        if rstrip:
            flat[i + 1] = flat[i + 1].lstrip()
        if lstrip:
            flat[i - 1] = flat[i - 1].rstrip()
    ids: list[int] = []
    for i, piece in enumerate(flat):
        if i % 2:
            ids.append(added[piece][0])
        elif piece:
            ids += plain(piece)
    if underline is not None and len(ids) > 1 and ids[0] == underline and ids[1] in special_ids:
        del ids[0]
    return ids
