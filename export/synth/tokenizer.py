"""Tokenizer files for synthetic base-model directories, in the exact HF release layout of the real bases.

Trained on the spot (no network) on a generated English + medical corpus, deterministic for a seed, a few seconds each.
Only the vocabulary size, special-token ids and flags and the tokenizer class copy the real releases; the pieces
themselves are ours. Both vocabularies are padded with unreachable dummy entries so that every id the real
tokenizers give a special token is the same here.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

PHI3_SP_PIECES = 32000  # Llama SentencePiece vocabulary: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>, then BPE pieces
PHI4_VOCAB = 100352  # cl100k's 100256 byte-level BPE entries + 96 special tokens (100256..100351)

# Phi-3-mini-4k-instruct's added tokens (id -> content); all special, all rstrip except <|endoftext|>.
PHI3_ADDED = {
    32000: "<|endoftext|>", 32001: "<|assistant|>", 32002: "<|placeholder1|>", 32003: "<|placeholder2|>",
    32004: "<|placeholder3|>", 32005: "<|placeholder4|>", 32006: "<|system|>", 32007: "<|end|>",
    32008: "<|placeholder5|>", 32009: "<|placeholder6|>", 32010: "<|user|>",
}  # fmt: skip

_WORDS = (
    "the a an of to in and is are was were be been this that these those it its with for on at by from as or not "
    "what which who how why when where can could would should may might will do does did have has had there here "
    "you your i my me we our they them he she his her image picture shows show see seen look looks like please "
    "describe explain tell about mean means serious normal abnormal patient doctor health medical clinical "
    "CT MRI X-ray x-ray ultrasound PET scan scans imaging modality slice slices axial coronal sagittal contrast "
    "lesion lesions mass tumor tumour nodule cyst fracture edema hemorrhage infarct stroke lung lungs liver kidney "
    "brain heart chest abdomen pelvis spine bone bones tissue organ left right upper lower anterior posterior "
    "diagnosis findings impression benign malignant cancer biopsy treatment follow-up size cm mm density signal "
    "intensity enhancement T1 T2 FLAIR DWI weighted reconstruct reconstruction generate convert version "
    "representation modern people medieval knight explanations helpful AI assistant system user question answer"
).split()
_UNICODE = ("café", "naïve", "µm", "37°C", "résumé", "Größe", "señal", "肺", "腫瘤", "→", "±", "—", "“quoted”")
_PUNCT = (".", ",", "?", "!", ":", ";", "(", ")", "'s", "-", "/", "%", '"')


def _corpus(seed: int, lines: int) -> list[str]:
    """Deterministic sentences: words, numbers, units, punctuation, a little unicode, runs of spaces and newlines."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        parts = []
        for _ in range(rng.randint(4, 18)):
            r = rng.random()
            if r < 0.75:
                w = rng.choice(_WORDS)
                parts.append(w.capitalize() if rng.random() < 0.1 else w)
            elif r < 0.87:
                parts.append(str(rng.choice((rng.randint(0, 9), rng.randint(10, 999), rng.randint(1000, 99999)))))
            elif r < 0.95:
                parts.append(rng.choice(_PUNCT))
            else:
                parts.append(rng.choice(_UNICODE))
        sep = "  " if rng.random() < 0.05 else " "
        line = sep.join(parts)
        out.append(line + rng.choice(("", "", "\n", "\n\n", "  ")))
    return out


def write_phi3_tokenizer(out_dir: Path, add_bos_token: bool = False, seed: int = 0) -> None:
    """Phi-3-mini-4k-instruct's tokenizer layout: tokenizer.model (32000 pieces) + config (len 32011).

    `add_bos_token` differs between Phi-3 revisions (false in the current one), so it is a parameter.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    # Llama's trainer spec: BPE, byte fallback, digits split, identity normalization, spaces kept as they are; no
    # newlines in the sentences, so "\n" is byte-fallback <0x0A> as in the real model.
    spm.SentencePieceTrainer.train(
        sentence_iterator=(s.rstrip("\n") for s in _corpus(seed, 6000)), model_writer=buf, model_type="bpe",
        vocab_size=2000, hard_vocab_limit=False, byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, character_coverage=0.9999, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, max_sentencepiece_length=16,
    )  # fmt: skip
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    low = min(p.score for p in proto.pieces) - 1.0
    # "<dummyNNNNN>" cannot be built by merging two existing pieces ("<dummy..." prefixes are never pieces), so the
    # padding is unreachable in both SentencePiece and the fast BPE converted from it.
    for i in range(PHI3_SP_PIECES - len(proto.pieces)):
        proto.pieces.add(piece=f"<dummy{i:05d}>", score=low - i, type=sp_pb2.ModelProto.SentencePiece.NORMAL)
    assert len(proto.pieces) == PHI3_SP_PIECES
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())

    def added(content: str, rstrip: bool = False) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False}

    # As in the real file: </s> is rstrip and not special; the chat tokens are rstrip (they eat the "\n" after them).
    decoder = {"0": {**added("<unk>"), "special": True}, "1": {**added("<s>"), "special": True},
               "2": {**added("</s>", rstrip=True), "special": False}}  # fmt: skip
    decoder.update({str(i): {**added(t, t != "<|endoftext|>"), "special": True} for i, t in PHI3_ADDED.items()})
    stm = {"bos_token": added("<s>"), "eos_token": added("<|endoftext|>"), "pad_token": added("<|endoftext|>"),
           "unk_token": added("<unk>")}  # fmt: skip
    config = {
        "add_bos_token": add_bos_token, "add_eos_token": False, "added_tokens_decoder": decoder,
        "bos_token": "<s>", "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "legacy": False,
        "model_max_length": 4096, "pad_token": "<|endoftext|>", "padding_side": "left", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>", "use_default_system_prompt": False,
    }  # fmt: skip
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", stm)
    _write_json(out_dir / "added_tokens.json", {t: i for i, t in PHI3_ADDED.items()})


def phi4_special_tokens() -> dict[int, str]:
    """phi-4's 96 special tokens at 100256..100351: the cl100k specials, <|im_*|>, and <|dummy_N|> filling the gaps."""
    named = {100256: "<|dummy_0|>", 100257: "<|endoftext|>", 100258: "<|fim_prefix|>", 100259: "<|fim_middle|>",
             100260: "<|fim_suffix|>", 100261: "<|dummy_1|>", 100262: "<|dummy_2|>", 100263: "<|dummy_3|>",
             100264: "<|im_start|>", 100265: "<|im_end|>", 100266: "<|im_sep|>", 100276: "<|endofprompt|>"}  # fmt: skip
    n = 4
    for i in range(100267, PHI4_VOCAB):
        if i not in named:
            named[i], n = f"<|dummy_{n}|>", n + 1
    return dict(sorted(named.items()))


def write_phi4_tokenizer(out_dir: Path, seed: int = 0) -> None:
    """microsoft/phi-4's tokenizer layout: GPT2Tokenizer vocab.json (100352 entries) + merges.txt + config.

    Special tokens as in the current phi-4 revision: bos <|endoftext|>, eos <|im_end|>, pad <|dummy_85|>, and every
    added token lstrip + rstrip (so the newlines around <|im_*|> in the HealthGPT template are swallowed).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, as the slow class uses
    trainer = trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)  # fmt: skip
    tok.train_from_iterator(_corpus(seed + 1, 6000), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    # Byte-level alphabet only (decodable by the slow class); no merge ever builds "<dummyNNNNNN>".
    for i in range(len(vocab), 100256):
        vocab[f"<dummy{i:06d}>"] = i
    specials = phi4_special_tokens()
    vocab.update({t: i for i, t in specials.items()})
    assert len(vocab) == PHI4_VOCAB and sorted(vocab.values()) == list(range(PHI4_VOCAB))

    flags = {"lstrip": True, "normalized": False, "rstrip": True, "single_word": False, "special": True}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for i, t in specials.items()},
        "bos_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 16384, "pad_token": "<|dummy_85|>", "tokenizer_class": "GPT2Tokenizer",
    }  # fmt: skip
    _write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json",
                {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"})  # fmt: skip
    _write_json(out_dir / "added_tokens.json", {t: i for i, t in specials.items()})


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
