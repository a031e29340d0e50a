"""The runtime tokenizer: tokenizer.json (written and verified by export/compile/tokenizer.py) behind the slow HF
semantics.

Torch-free: only `tokenizers` and the standard library. `encode` returns what the reference's slow tokenizer returns
for `tokenizer(text).input_ids`; `decode` what its `decode` returns. Slow behaviours that a tokenizer.json cannot
express are reproduced here (export/compile/tokenizer.py proves the encoding on the real prompts,
tests/test_tokenizer.py the decoding):

- Llama with `legacy=False` (Phi-3): the slow class prepends "▁" to the whole text, tokenizes, then drops a leading
  "▁" token only when the next token is one of `all_special_tokens`. So "<|system|>..." starts with a "▁" token
  ("<|system|>" is an added token but not in `all_special_tokens`), while the converted pre-tokenizer (Metaspace,
  prepend_scheme "first") prepends nothing before an added token, and nothing before a text that already starts with
  a space. Prepending "▁" ourselves and applying the same drop rule gives the slow ids in every case.
- Slow `decode` joins text runs and added tokens outside `all_special_tokens` (e.g. `<|end|>`, and HealthGPT's tokens
  when they are not skipped) with single spaces; HealthGPT's `[:-8]` relies on that " <|end|>".
- rstrip/lstrip of added tokens strip Python whitespace in the slow class, Unicode White_Space in `tokenizers`; the
  two differ only on U+001C..U+001F, which are stripped here first when present.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from runtime.errors import UserError
from runtime.healthgpt import HEALTHGPT_TOKENS
from runtime.prompt import split_image_tokens

UNDERLINE = "\u2581"  # SentencePiece's space
PY_ONLY_SPACE = frozenset("\x1c\x1d\x1e\x1f")  # str.isspace() but not Unicode White_Space
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece byte-fallback pieces


class Tokenizer:
    def __init__(self, backend, spec: dict, bos_id: int | None, add_bos: bool):
        self._tok = backend
        self.bos_id = bos_id
        self.add_bos = bool(add_bos)
        added = spec.get("added_tokens") or []
        # The export marks `special` exactly for the slow tokenizer's all_special_tokens.
        self.special_ids = frozenset(t["id"] for t in added if t["special"])
        # Slow decode's "legacy added tokens": added tokens outside all_special_tokens, plus the additional special
        # tokens past the model vocabulary (HealthGPT's); each stands alone, joined to its neighbours by a space.
        healthgpt = set(HEALTHGPT_TOKENS)
        self._alone_ids = frozenset(t["id"] for t in added if not t["special"] or t["content"] in healthgpt)
        self._prefix_first = _metaspace_first(spec.get("pre_tokenizer"))
        self._underline_id = backend.token_to_id(UNDERLINE) if self._prefix_first else None
        self._strips = {t["content"]: (t["lstrip"], t["rstrip"]) for t in added if t["lstrip"] or t["rstrip"]}
        self._added_re = None  # built on first need: all added tokens, longest first (the slow trie's match)
        self._added_contents = [t["content"] for t in added]
        if self.add_bos and bos_id is None:
            raise UserError("the tokenizer manifest asks for a BOS token but gives no bos_id")

    @classmethod
    def load(cls, path: Path, bos_id: int | None, add_bos: bool) -> "Tokenizer":
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

    def encode(self, text: str) -> list[int]:
        """The slow tokenizer's `tokenizer(text).input_ids`: BOS (when add_bos) + ids, never EOS."""
        if self._prefix_first and text:
            # Llama legacy=False: see the module docstring. With a leading "▁" Metaspace's own prepend never fires;
            # the slow class also turns every "▁" into a space first (so an rstrip token then eats it).
            text = UNDERLINE + text.replace(UNDERLINE, " ")
        if self._strips and not PY_ONLY_SPACE.isdisjoint(text):
            text = self._python_strip(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids if text else []
        if self._prefix_first and len(ids) > 1 and ids[0] == self._underline_id and ids[1] in self.special_ids:
            ids = ids[1:]
        return [self.bos_id, *ids] if self.add_bos else ids

    def _python_strip(self, text: str) -> str:
        """The slow tokenizer's split on added tokens and its str.strip() around lstrip/rstrip tokens, re-joined."""
        if self._added_re is None:
            alts = sorted(self._added_contents, key=len, reverse=True)
            self._added_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")")
        parts = self._added_re.split(text)  # odd indices are added tokens
        for i in range(1, len(parts), 2):
            lstrip, rstrip = self._strips.get(parts[i], (False, False))
            if rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
        return "".join(parts)

    def prompt_ids(self, prompt: str) -> list[int]:
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
        if not self._prefix_first:
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
