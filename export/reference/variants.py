"""The one table of per-variant, per-task settings (reference: HealthGPT config.py and llava/demo/*.sh).

The argparse defaults of the reference demos (r=16, alpha=32, vq_idx_nums=1024, FP32) do not match the released
weights; only these values do.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.contract import healthgpt
from runtime.contract.errors import UserError


@dataclass(frozen=True)
class ReleaseTask:
    """A task as its release files configure it: the H-LoRA plugin and the CLIP layer it reads (manifest: TaskEntry)."""
    rank: int  # total H-LoRA rank over all experts; each expert owns rank / experts rows of A
    alpha: int
    clip_layer: int  # index into CLIP's output_hidden_states: -2 = output of block 23 of 24, 1 = output of block 1
    hlora_file: str
    fusion_file: str | None  # embed_tokens / lm_head loaded over the extended vocabulary (GEN only)
    experts: int = 4

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank * self.experts  # = alpha / per-expert rank = 8.0 in every release

    def clip_blocks(self, total_blocks: int) -> int:
        """How many CLIP encoder blocks the task's features need (the rest is pruned)."""
        return self.clip_layer % (total_blocks + 1)


@dataclass(frozen=True)
class Variant:
    name: str
    release_dir: str  # folder of the HealthGPT release files
    base_dir: str  # folder of the base LLM (HF layout)
    template: str
    tasks: dict[str, ReleaseTask]


CLIP_DIR = "clip-vit-large-patch14-336"
VQGAN_DIR = "taming_transformers/ckpt"  # last.ckpt + model.yaml, as HealthGPT's README places them

VARIANTS = {
    "m3": Variant(
        name="m3",
        release_dir="HealthGPT-M3",
        base_dir="Phi-3-mini-4k-instruct",
        template="phi3_instruct",
        tasks={
            "com": ReleaseTask(rank=64, alpha=128, clip_layer=-2, hlora_file="com_hlora_weights.bin", fusion_file=None),
            "gen": ReleaseTask(rank=256, alpha=512, clip_layer=1, hlora_file="gen_hlora_weights.bin",
                              fusion_file="fusion_layer_weights.bin"),
        },
    ),
    "l14": Variant(
        name="l14",
        release_dir="HealthGPT-L14",
        base_dir="phi-4",
        template="phi4_instruct",
        tasks={
            "com": ReleaseTask(rank=32, alpha=64, clip_layer=-2, hlora_file="com_hlora_weights_phi4.bin",
                              fusion_file=None),
        },
    ),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def get_task(variant: Variant, task: str) -> ReleaseTask:
    healthgpt.task(task)  # a task HealthGPT has at all
    if task not in variant.tasks:
        raise UserError(f"HealthGPT-{variant.name.upper()} has no {task} checkpoint: the release supports "
                        f"{', '.join(variant.tasks)} only (the reference refuses L14 generation too)")
    return variant.tasks[task]
