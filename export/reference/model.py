"""The PyTorch reference: what HealthGPT's released inference code computes, for one variant and task.

Built from the release files exactly as the reference builds it (healthgpt.md §7): base weights, vocabulary
extended with mean-filled rows, H-LoRA + projector (bf16 cast to the model dtype), then (GEN) the fusion rows.
Everything downstream (ONNX graphs, engines, the runtime) is checked against this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import CLIPImageProcessor, CLIPVisionModel, LogitsProcessor, Phi3Config, Phi3ForCausalLM
from transformers.generation.streamers import BaseStreamer

from export.reference.checkpoint import (
    PEFT_PREFIX,
    CheckpointPaths,
    assign_weights,
    check_loading,
    load_state_dict,
    weight_files,
)
from export.reference.hlora import attach_hlora
from export.reference.tensors import ReleaseTensors
from export.reference.tokenizer import ReferenceEncoder, load_reference_tokenizer
from export.reference.variants import ReleaseTask, Variant, get_task
from export.reference.vqgan import GumbelVQDecoder, load_vqgan
from runtime.contract.errors import UserError
from runtime.contract.healthgpt import COM, GEN, HEALTHGPT_TOKENS, IMAGE_TOKEN_INDEX, IMAGE_TOKENS, TASKS, VQ_CODES
from runtime.core.clip_input import expand2square
from runtime.core.prompt import TEMPLATES, split_image_tokens, vq_indices


def _hf_loaded(cls, path, dtype, what: str, unused: tuple[str, ...] = ()):
    try:
        model, info = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager", local_files_only=True,
                                          output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - truncated shards, unreadable configs, pickles HF refuses: say which
        raise UserError(f"cannot load {what} from {path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
                        ) from None
    check_loading(info, path, what, unused)
    return model.eval()


# A release CLIP folder is the whole CLIPModel; HealthGPT uses the vision tower only.
CLIP_TEXT_TOWER = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def extend_vocabulary(llm: Phi3ForCausalLM, new_len: int, n_new: int) -> None:
    """resize_token_embeddings, then every new row of embed_tokens and lm_head := mean of the rows before them
    (LLaVA's smart resize, computed in the model dtype as the reference does). For Phi-3 this also overwrites the
    unused padding rows 32011..32063, because the resize shrinks nothing but the new rows start at 32011."""
    llm.resize_token_embeddings(new_len, mean_resizing=False)
    with torch.no_grad():
        for w in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            w[-n_new:] = w[:-n_new].mean(dim=0, keepdim=True)


class IdxOnly(LogitsProcessor):
    """Opt-in: mask the logits to the `<idx_*>` range so random or weak weights still yield one full image."""

    def __init__(self, idx0: int):
        self.idx0 = idx0

    def __call__(self, input_ids, scores):
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.idx0: self.idx0 + VQ_CODES] = scores[:, self.idx0: self.idx0 + VQ_CODES]
        return masked


@dataclass
class HealthGPT:
    variant: Variant
    task: str
    cfg: ReleaseTask
    tokenizer: object  # slow HF tokenizer with HealthGPT's tokens added
    image_processor: CLIPImageProcessor
    clip: CLIPVisionModel
    projector: nn.Sequential
    llm: Phi3ForCausalLM
    vqgan: GumbelVQDecoder | None
    eos_ids: list[int]
    tensors: ReleaseTensors | None = None  # stream=True: where `layer(i)` reads the decoder layers from

    @property
    def base_len(self) -> int:
        return len(self.tokenizer) - len(HEALTHGPT_TOKENS)

    @property
    def idx0(self) -> int:
        return self.base_len + 1  # <idx_0>; <start_index> is base_len

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.dtype

    def pixel_values(self, image) -> torch.Tensor:
        """PIL RGB image -> [1,3,336,336]: pad to square, then CLIPImageProcessor (bicubic 336, mean/std)."""
        pv = self.image_processor.preprocess(expand2square(image), return_tensors="pt")["pixel_values"]
        return pv.to(self.dtype)

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1,3,336,336] -> [1,576,hidden]: hidden_states[clip_layer], CLS dropped, then the task's projector."""
        feats = self.clip(pixel_values, output_hidden_states=True).hidden_states[self.cfg.clip_layer][:, 1:]
        return self.projector(feats.to(self.dtype))

    @cached_property
    def _encode(self) -> ReferenceEncoder:
        return ReferenceEncoder(self.tokenizer)

    def prompt_ids(self, question: str, has_image: bool = True, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """LLaVA's tokenizer_image_token over the template, with the question as plain text (its `<|end|>` is text);
        history: the earlier (question, answer) turns, rendered again as LLaVA's conversation object does."""
        parts = TEMPLATES[self.variant.template].parts(question, has_image, self.task, history)
        return split_image_tokens(parts, self._encode, self.tokenizer.bos_token_id)

    @torch.no_grad()
    def embed(self, ids: list[int], image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Text ids embedded, the image rows spliced in at the single -200 slot: [1, L, hidden]."""
        if IMAGE_TOKEN_INDEX not in ids:
            return self.llm.model.embed_tokens(torch.tensor([ids]))
        at = ids.index(IMAGE_TOKEN_INDEX)
        before = self.llm.model.embed_tokens(torch.tensor([ids[:at]], dtype=torch.long))
        after = self.llm.model.embed_tokens(torch.tensor([ids[at + 1:]], dtype=torch.long))
        return torch.cat([before, image_embeds, after], dim=1)

    @torch.no_grad()
    def generate(self, ids: list[int], image_embeds: torch.Tensor | None, max_new_tokens: int,
                 constrain_image_tokens: bool = False) -> list[int]:
        """HF generate, greedy, KV cache, driven by inputs_embeds as the reference does; new tokens only,
        the stop token removed."""
        embeds = self.embed(ids, image_embeds)
        steps = IMAGE_TOKENS if constrain_image_tokens else max_new_tokens
        with _Progress(steps, f"PyTorch reference {self.task}") as progress:
            out = self.llm.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, max_new_tokens=steps,
                eos_token_id=self.eos_ids, pad_token_id=self.eos_ids[0],
                logits_processor=[IdxOnly(self.idx0)] if constrain_image_tokens else None, streamer=progress,
            )[0].tolist()
        return out[:-1] if out and out[-1] in self.eos_ids else out

    def layer(self, i: int) -> nn.Module:
        """Decoder layer i with its weights read in (stream=True references; `drop_layer` frees it again)."""
        layer = self.llm.model.layers[i]
        layer.to_empty(device="cpu")
        targets = {hlora_key(i, k): p for k, p in layer.named_parameters()}
        _copy(targets, self.tensors.take(list(targets), self.dtype))
        return layer

    def drop_layer(self, i: int) -> None:
        self.llm.model.layers[i].to("meta")

    def conversation(self, image, questions: Sequence[str], max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
        """LLaVA's multi-turn loop: each turn the whole conversation rendered and tokenized again, then a fresh HF
        generate over it (no cache kept between turns); each earlier answer enters as its decoded, stripped text.
        -> (prompt ids, new tokens) per turn."""
        embeds = self.encode_image(self.pixel_values(image)) if image is not None else None
        history: list[tuple[str, str]] = []
        turns = []
        for question in questions:
            ids = self.prompt_ids(question, image is not None, history)
            tokens = self.generate(ids, embeds, max_new_tokens)
            history.append((question, self.tokenizer.decode(tokens, skip_special_tokens=True)))
            turns.append((ids, tokens))
        return turns

    def answer(self, image, question: str, max_new_tokens: int = COM.max_new_tokens) -> str:
        ids = self.generate(self.prompt_ids(question), self.encode_image(self.pixel_values(image)), max_new_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_image(self, image, instruction: str, max_new_tokens: int = GEN.max_new_tokens,
                       constrain_image_tokens: bool = False) -> np.ndarray:
        """-> uint8 [256,256,3]; exactly 1024 `<idx_*>` tokens are required."""
        ids = self.generate(self.prompt_ids(instruction), self.encode_image(self.pixel_values(image)),
                            max_new_tokens, constrain_image_tokens)
        indices = vq_indices(ids, self.idx0)
        return self.vqgan(torch.tensor([indices]))[0].numpy()


class _Progress(BaseStreamer):
    """A progress bar over HF generate's new tokens (at full size 1024 image tokens take ~20 min on a CPU). generate
    puts the prompt first (empty here: it is driven by inputs_embeds), then each step's token."""

    def __init__(self, total: int, desc: str):
        self.bar, self.prompt_seen = tqdm(total=total, desc=desc, unit="token", leave=False), False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.bar.update(value.numel())
        self.prompt_seen = True

    def end(self) -> None:
        self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def load_reference(checkpoint: str | Path | CheckpointPaths, task: str, dtype: torch.dtype = torch.float32,
                   stream: bool = False) -> HealthGPT:
    """stream=False: HF's own from_pretrained loads the base model (the parity reference).
    stream=True: the decoder layers stay on the meta device (no memory) and `ref.layer(i)` reads one layer at a
    time from the release files with our own reader - the streaming export; the rest (tables, CLIP, projector) is
    loaded as usual. The two loaders are independent on purpose: parity compares one against the other."""
    paths = checkpoint if isinstance(checkpoint, CheckpointPaths) else CheckpointPaths.find(checkpoint)
    cfg = get_task(paths.variant, task)
    tokenizer = load_reference_tokenizer(paths.base)
    tensors = ReleaseTensors([*_base_files(paths.base), *filter(None, (paths.hlora(task), paths.fusion(task)))]
                             ) if stream else None
    llm = _hf_loaded(Phi3ForCausalLM, paths.base, dtype, "the base LLM") if tensors is None else _skeleton(
        paths.base, dtype, tensors)
    extend_vocabulary(llm, len(tokenizer), len(HEALTHGPT_TOKENS))
    attach_hlora(llm, cfg.rank, cfg.alpha, cfg.experts)
    clip = _hf_loaded(CLIPVisionModel, paths.clip, dtype, "CLIP", unused=CLIP_TEXT_TOWER)
    hidden = llm.config.hidden_size
    projector = nn.Sequential(nn.Linear(clip.config.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    projector = projector.to(dtype).eval()

    params = {f"{PEFT_PREFIX}model.mm_projector.{k}": p for k, p in projector.named_parameters()}
    fusion = paths.fusion(task)
    fusion_params = {f"{PEFT_PREFIX}model.embed_tokens.weight": llm.model.embed_tokens.weight,
                     f"{PEFT_PREFIX}lm_head.weight": llm.lm_head.weight}
    if tensors is None:
        params.update({hlora_key(i, k): p for i, layer in enumerate(llm.model.layers)
                       for k, p in layer.named_parameters() if ".lora_" in k})
        assign_weights(params, load_state_dict(paths.hlora(task)), paths.hlora(task))
        if fusion is not None:  # loaded after H-LoRA, over the extended vocabulary
            assign_weights(fusion_params, load_state_dict(fusion), fusion)
    else:
        _copy(params, tensors.take(list(params), dtype))
        if fusion is not None:
            _copy(fusion_params, tensors.take(list(fusion_params), dtype))
    vqgan = load_vqgan(paths.vqgan_ckpt, paths.vqgan_yaml) if TASKS[task].makes_images else None
    return HealthGPT(paths.variant, task, cfg, tokenizer, CLIPImageProcessor.from_pretrained(paths.clip), clip,
                     projector, llm.eval(), vqgan, paths.eos_ids(), tensors)


def hlora_key(layer: int, name: str) -> str:
    """The release key of a decoder layer's parameter (`self_attn.qkv_proj.lora_A.weight`, `input_layernorm.weight`):
    H-LoRA tensors in the PeftModel's names, base tensors in HF's."""
    key = f"model.layers.{layer}.{name}"
    return PEFT_PREFIX + key if ".lora_" in name else key


def _base_files(base: Path) -> list[Path]:
    files = weight_files(base, "the base LLM")
    if not files:
        raise UserError(f"{base} holds no safetensors weights (model.safetensors or shards with their index)")
    return files


def _skeleton(base: Path, dtype: torch.dtype, tensors: ReleaseTensors) -> Phi3ForCausalLM:
    """Phi-3 built on the meta device, only the tables and the final norm read in."""
    config = Phi3Config.from_pretrained(base, local_files_only=True)
    with torch.device("meta"):
        llm = Phi3ForCausalLM._from_config(config, attn_implementation="eager", dtype=dtype)
    top = {k: p for k, p in llm.named_parameters() if not k.startswith("model.layers.")}
    for module in (llm.model.embed_tokens, llm.model.norm, llm.lm_head):
        module.to_empty(device="cpu")
    _copy({k: p for k, p in llm.named_parameters() if k in top}, tensors.take(list(top), dtype))
    return llm


def _copy(targets: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, dst in targets.items():
            if got[k].shape != dst.shape:
                raise UserError(f"{k} has shape {tuple(got[k].shape)} in the checkpoint, expected {tuple(dst.shape)}")
            dst.copy_(got[k])
