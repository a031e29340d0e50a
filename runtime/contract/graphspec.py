"""The description of one graph: tensor names, dtypes, symbolic dims with their ranges, profiles, tolerance.

Declared once per graph in `export/compile/specs.py`, written into the bundle manifest by the exporter, and read
back from the manifest by the engine builder, the runtime and the verifier, so no one re-types a tensor name or a shape.
Everything else (dynamic axes, TensorRT profiles, concrete shapes, sample feeds) is derived here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Dim:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"bad dim range {self}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints, or names of dims declared in the graph's `dims`
    values: tuple[int, int] | None = None  # integer inputs: sample values in [lo, hi)

    def to_json(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.values is not None:
            out["values"] = list(self.values)
        return out

    @classmethod
    def from_json(cls, d: dict) -> TensorSpec:
        return cls(d["name"], d["dtype"], tuple(d["shape"]), tuple(d["values"]) if "values" in d else None)


@dataclass(frozen=True)
class Tolerance:
    """Per-graph parity bounds against the PyTorch reference (fp32 graphs; other precisions scale them)."""

    max_abs: float
    min_cosine: float


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, Dim] = field(default_factory=dict)
    # TensorRT optimization profiles as overrides of `dims` (e.g. prefill and decode); none means one profile.
    profiles: tuple[dict[str, Dim], ...] = ()
    tolerance: Tolerance = Tolerance(1e-4, 0.99999)
    # Decoders: (cache input, new-rows output) per layer and kind, the pairs the runtime's KV cache binds.
    kv_pairs: tuple[tuple[str, str], ...] = ()

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def shape(self, name: str, **dims: int) -> tuple[int, ...]:
        """Concrete shape of one tensor; unnamed symbolic dims take their `opt` value."""
        return tuple(d if isinstance(d, int) else dims.get(d, self.dims[d].opt) for d in self.tensor(name).shape)

    def render(self, name: str) -> str:
        """A tensor's shape for people, symbolic dims with their range: [1, seq=1..2048, 3072]."""
        dims = (str(d) if isinstance(d, int) or d not in self.dims else f"{d}={self.dims[d].min}..{self.dims[d].max}"
                for d in self.tensor(name).shape)
        return f"[{', '.join(dims)}]"

    def trt_profiles(self) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
        """Per profile, input name -> (min, opt, max) shapes, as TensorRT's `Profile.add` takes them."""
        profiles = []
        for override in self.profiles or ({},):
            ranges = {**self.dims, **override}
            profiles.append({
                t.name: tuple(self.shape(t.name, **{k: getattr(r, which) for k, r in ranges.items()})
                              for which in ("min", "opt", "max"))
                for t in self.inputs
            })
        return profiles

    def sample_inputs(self, rng: np.random.Generator, **dims: int) -> dict[str, np.ndarray]:
        feeds = {}
        for t in self.inputs:
            shape, dtype = self.shape(t.name, **dims), np.dtype(t.dtype)
            if t.values is not None:
                feeds[t.name] = rng.integers(*t.values, size=shape).astype(dtype)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        return feeds

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "dims": {k: [d.min, d.opt, d.max] for k, d in self.dims.items()},
            "profiles": [{k: [d.min, d.opt, d.max] for k, d in p.items()} for p in self.profiles],
            "tolerance": {"max_abs": self.tolerance.max_abs, "min_cosine": self.tolerance.min_cosine},
            "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes().items()},
            "kv_pairs": [list(p) for p in self.kv_pairs],
        }

    @classmethod
    def from_json(cls, d: dict) -> GraphSpec:
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            dims={k: Dim(*v) for k, v in d["dims"].items()},
            profiles=tuple({k: Dim(*v) for k, v in p.items()} for p in d["profiles"]),
            tolerance=Tolerance(**d["tolerance"]),
            kv_pairs=tuple((past, present) for past, present in d["kv_pairs"]),
        )
