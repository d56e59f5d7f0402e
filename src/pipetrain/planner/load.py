"""Models and clusters by name: a preset, "local" (this machine, measured), or a TOML file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .calibrate import local_cluster
from .specs import CLUSTERS, MODELS, ClusterSpec, ModelSpec, SpecError


def model_from(name_or_path: str) -> ModelSpec:
    """A preset name, or a TOML file with ModelSpec's fields."""
    if name_or_path in MODELS:
        return MODELS[name_or_path]
    return _from_toml(ModelSpec, name_or_path, MODELS)


def cluster_from(name_or_path: str, model: ModelSpec | None = None, microbatch_size: int | None = None) -> ClusterSpec:
    """A preset name, "local" (this machine's cores, measured on one block of `model`), or a TOML file
    with ClusterSpec's fields."""
    if name_or_path in CLUSTERS:
        return CLUSTERS[name_or_path]
    if name_or_path == "local":
        return local_cluster(model, microbatch_size or 4)
    return _from_toml(ClusterSpec, name_or_path, CLUSTERS)


def _from_toml(cls, path: str, presets: dict):
    file = Path(path)
    if not file.exists():
        kind = "model" if cls is ModelSpec else "cluster"
        extra = ', "local"' if cls is ClusterSpec else ""
        raise SpecError(f"unknown {kind} {path!r}: use one of {sorted(presets)}{extra}, or a TOML file")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    values = tomllib.loads(file.read_text())
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SpecError(f"{path}: unknown field(s) {unknown}; known: {sorted(names)}")
    values.setdefault("name", file.stem)
    try:
        spec = cls(**values)
    except TypeError as err:
        raise SpecError(f"{path}: {err}") from None
    _validate(spec, path)
    return spec


def _validate(spec, where: str) -> None:
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise SpecError(f"{where}: {f.name} must be >= 0, got {value}")
    if isinstance(spec, ModelSpec) and spec.hidden % spec.heads:
        raise SpecError(f"{where}: hidden={spec.hidden} is not divisible by heads={spec.heads}")
    if isinstance(spec, ClusterSpec) and spec.dtype not in spec.peak_flops:
        raise SpecError(f"{where}: dtype={spec.dtype!r} has no entry in peak_flops {sorted(spec.peak_flops)}")
