"""HealthGPT's facts, in one place (reference: healthgpt.md): its tasks and their graphs, the reference demos' token
budgets, the prompt suffix of generation, and the image / VQ numbers. Code that needs one of these reads it here:
no string tests on task names elsewhere, no number restated.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.contract.errors import UserError

IMAGE_SIZE = 336  # CLIP ViT-L/14-336 input side
IMAGE_PATCHES = 576  # (336 / 14) ** 2 patch tokens, CLS dropped
VQ_CODES = 8192  # <idx_0> .. <idx_8191>
IMAGE_TOKENS = 1024  # one 32 x 32 latent grid
OUT_SIZE = 256  # side of a generated image

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the prompt slot where the 576 projected image vectors are spliced in
START_INDEX = "<start_index>"  # appended to the GEN prompt; the model then emits <idx_N> tokens
HEALTHGPT_TOKENS = (START_INDEX, *(f"<idx_{i}>" for i in range(VQ_CODES)), "<end_index>", "<pixel_newline>")

TASK_GRAPHS = ("vision", "embed", "decoder")  # every task has its own of each (its H-LoRA and CLIP cut inside)
SHARED = "shared"  # graph-id prefix of the graphs tasks share


@dataclass(frozen=True)
class Task:
    name: str
    max_new_tokens: int  # the reference demo's default budget
    prompt_suffix: str  # appended after the assistant role
    shared_graphs: tuple[str, ...]  # shared graphs the task needs besides its own
    makes_images: bool  # its tokens are VQ indices for the VQGAN


COM = Task("com", max_new_tokens=1024, prompt_suffix="", shared_graphs=(), makes_images=False)
GEN = Task("gen", max_new_tokens=1100, prompt_suffix=START_INDEX, shared_graphs=("vqgan",), makes_images=True)
TASKS = {t.name: t for t in (COM, GEN)}
SHARED_GRAPHS = frozenset(g for t in TASKS.values() for g in t.shared_graphs)


def task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose com (answer questions) or gen (generate images)")
    return TASKS[name]


def graph_id(task_name: str, graph: str) -> str:
    """The bundle's name of a task's graph: `com.decoder`, or `shared.vqgan` for a graph the tasks share."""
    return f"{SHARED}.{graph}" if graph in SHARED_GRAPHS else f"{task_name}.{graph}"
