"""Models on a worker: where one is found (never downloaded), what it is (quantization,
parameters), and the cache of those loaded, bounded by count and bytes."""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxserve.contract.validation import EngineError

logger = logging.getLogger(__name__)

# Files whose change on disk means a loaded copy no longer matches the model.
WATCHED_SUFFIXES = (".safetensors", ".json", ".model", ".tiktoken", ".jinja", ".txt")


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any
    tokenizer: Any
    size_bytes: int
    parameters: int
    quantization: Quantization
    fingerprint: dict[str, tuple[int, int]]
    kv_bytes_per_token: int | None = None  # measured on first use (engine.scheduler)


def files_fingerprint(path: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the model's own files: cheap to take before every use."""
    result = {}
    for child in path.iterdir():
        if child.suffix in WATCHED_SUFFIXES and child.is_file():
            stat = child.stat()
            result[child.name] = (stat.st_mtime_ns, stat.st_size)
    return result


def resolve_model_path(model: str, model_path: str | None) -> Path:
    """A local directory, or a Hugging Face repo already in the local cache, that holds an MLX
    model and no code of its own (``usable_model_dir``). Never downloads.

    Whatever is missing (the directory, its config, its weights), the answer is the same: an
    ``error`` event every reader sees must not tell whether some path exists on a worker."""
    target = model_path or model
    candidate = Path(target).expanduser()
    path: Path | None = candidate.resolve() if candidate.is_dir() else None
    if path is None and "/" in target and not target.startswith(("/", ".", "~")):
        try:
            from mlx_lm.utils import hf_repo_to_path

            path = Path(hf_repo_to_path(target))
        except Exception:  # not in the local cache: huggingface_hub raises several kinds
            path = None
    refusal = "not found" if path is None else usable_model_dir(path)
    if refusal:
        # Why, only in this worker's own log (its host's operator reads it), not in the event.
        logger.warning("Model %r (%s) refused: %s", model, target, refusal)
        raise EngineError(
            "ModelNotFound",
            f"Model {model!r} not found: no MLX model (a config.json and .safetensors weights, "
            "no code) at its path or in the local Hugging Face cache of this worker",
        )
    assert path is not None
    return path


def usable_model_dir(path: Path) -> str | None:
    """Why ``path`` is not a model mlx-lm may load here, or None: it must hold a ``config.json``
    (a JSON object that names no ``model_file``: no code from a model directory is ever run)
    and ``.safetensors`` weights."""
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable config.json"
    if not isinstance(config, dict):
        return "config.json is not an object"
    if "model_file" in config or "auto_map" in config:
        return "config.json asks for code to be run (model_file or auto_map)"
    if not any(path.glob("*.safetensors")):
        return "no .safetensors weights"
    return None


@dataclass(frozen=True)
class Quantization:
    """How a model's weights are stored, from its config (mlx-lm writes ``quantization``:
    ``bits``, ``group_size``, ``mode``; Hugging Face ``quantization_config``)."""

    bits: int | None = None  # None: not quantized
    group_size: int | None = None
    mode: str | None = None
    layers: dict[str, int] = field(default_factory=dict)  # per-layer bits where they differ

    @property
    def seed_value(self) -> str | None:
        """The contract's ``quantization`` (``none``, ``int4``, ``int8``), or None when it has
        no name for this one (3, 5, 6 bits, float modes such as ``mxfp4``)."""
        if self.bits is None:
            return "none"
        if self.mode in (None, "affine") and self.bits in (4, 8):
            return f"int{self.bits}"
        return None

    def as_metadata(self) -> dict[str, Any]:
        return {"bits": self.bits, "groupSize": self.group_size, "mode": self.mode} if self.bits else {}

    def labels(self) -> dict[str, str]:
        """The worker metric's labels: empty strings for a model stored unquantized."""
        return {
            "bits": str(self.bits or ""),
            "group_size": str(self.group_size or ""),
            "mode": (self.mode or "affine") if self.bits else "",
        }

    def bits_of(self, layer: str) -> int | None:
        return self.layers.get(layer, self.bits)


def quantization_of(config: dict[str, Any]) -> Quantization:
    quant = config.get("quantization") or config.get("quantization_config") or {}
    if not isinstance(quant, dict) or not isinstance(quant.get("bits"), int):
        return Quantization()
    layers = {
        name: spec["bits"]
        for name, spec in quant.items()
        if isinstance(spec, dict) and isinstance(spec.get("bits"), int)
    }
    group_size = quant.get("group_size")
    mode = quant.get("mode") if isinstance(quant.get("mode"), str) else None
    return Quantization(
        bits=quant["bits"],
        group_size=group_size if isinstance(group_size, int) else None,
        mode=mode,
        layers=layers,
    )


def parameters_counted(named_weights: list[tuple[str, Any]], quantization: Quantization) -> int:
    """Parameters, counted from the weights as the unquantized model has them: a quantized
    layer's packed ``uint32`` words hold 32/bits weights each, and its ``scales`` and
    ``biases`` are how it is stored, not parameters."""
    packed = {
        name.removesuffix(".weight")
        for name, w in named_weights
        if quantization.bits and name.endswith(".weight") and str(w.dtype) == "mlx.core.uint32"
    }
    total = 0
    for name, w in named_weights:
        layer, _, kind = name.rpartition(".")
        if layer in packed and kind in ("scales", "biases"):
            continue
        size = int(w.size)
        if layer in packed and kind == "weight":
            size = size * 32 // (quantization.bits_of(layer) or 32)
        total += size
    return total


class ModelCache:
    """Loaded models, least recently used first out; bounded by count and by bytes."""

    def __init__(self, *, max_models: int = 2, max_bytes: int = 0) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes  # 0: no byte limit
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> LoadedModel | None:
        loaded = self._models.get(name)
        if loaded is not None:
            self._models.move_to_end(name)
        return loaded

    def peek(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def put(self, loaded: LoadedModel) -> None:
        self._models[loaded.name] = loaded

    def pop(self, name: str) -> LoadedModel | None:
        return self._models.pop(name, None)

    def victims_for(self, incoming_bytes: int) -> list[str]:
        """Which models to evict (oldest first) to make room for one of ``incoming_bytes``."""
        names = list(self._models)
        victims: list[str] = []
        total = sum(m.size_bytes for m in self._models.values())
        while names and (
            len(names) + 1 > self.max_models or (self.max_bytes and total + incoming_bytes > self.max_bytes)
        ):
            name = names.pop(0)
            victims.append(name)
            total -= self._models[name].size_bytes
        return victims
