"""Fitted checkpoints: tensors in a safetensors file, everything else as JSON in its metadata.

Nothing is unpickled: a checkpoint is ``<digest>.safetensors`` whose header metadata ``zsad`` holds
the method, config, backbone identity, training-data fingerprint, seed and the non-tensor part of
``Detector.state_dict()`` (tensors are replaced there by ``{"__tensor__": name}``). Checkpoints of
zsad-bench before 0.2 (``<digest>.pt``, pickled) are never loaded: the runner says so and refits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from zsad_bench.detector import Detector
from zsad_bench.errors import ZsadError
from zsad_bench.results import atomic_write_bytes

SUFFIX = ".safetensors"
FORMAT = "zsad-bench/checkpoint/v2"
_TENSOR = "__tensor__"


def _split(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor moved into ``tensors`` and replaced by a reference."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise ZsadError(f"state_dict keys must be strings to be saved, got {sorted(map(repr, obj))[:3]}")
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise ZsadError(f"state_dict value of type {type(obj).__name__} cannot be saved; return tensors or plain values")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(detector: Detector, path: Path, data_fingerprint: str, seed: int) -> None:
    """Save ``detector.state_dict()`` with its method, config, backbone identity and training-data hash."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": FORMAT,
        "method": detector.name,
        "config": dataclasses.asdict(detector.config),
        "backbone": detector.backbone.identity,
        "data_fingerprint": data_fingerprint,
        "seed": seed,
        "state": _split(detector.state_dict(), tensors),
    }
    blob = safetensors_bytes(tensors, metadata={"zsad": json.dumps(meta, default=str)})
    atomic_write_bytes(path, blob)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata with ``state`` restored (tensors on CPU); one-line ZsadError when unusable."""
    path = Path(path)
    if path.suffix == ".pt":
        raise ZsadError(
            f"{path}: pickled checkpoint of an older zsad-bench; it is not loaded (unsafe): re-run the same run to "
            "refit it"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {}).get("zsad", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise ZsadError(f"{path}: checkpoint not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ZsadError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to refit") from None
    if meta.get("format") != FORMAT:
        raise ZsadError(f"{path}: not a zsad-bench checkpoint (format {meta.get('format')!r}); delete it to refit")
    meta["state"] = _join(meta.get("state", {}), tensors)
    return meta


def load_checkpoint(detector: Detector, path: Path) -> dict[str, Any]:
    """Load a checkpoint into ``detector`` after checking method and backbone; returns its metadata."""
    meta = read_checkpoint(path)
    if meta.get("method") != detector.name:
        raise ZsadError(f"{path}: checkpoint of method '{meta.get('method')}', not '{detector.name}'")
    if meta.get("backbone") != detector.backbone.identity:
        raise ZsadError(
            f"{path}: checkpoint was fitted on backbone '{meta.get('backbone')}', "
            f"not '{detector.backbone.identity}'; run with the same --backbone/--image-size/--weights"
        )
    detector.load_state_dict(meta["state"])
    return meta
