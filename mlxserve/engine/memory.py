"""What a worker's generations may hold in memory: the machine's memory for mlx, the bytes a
token adds to a model's key-value cache, and the model's context. The scheduler admits a request
only if its cache at full length fits."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxserve.engine.models import LoadedModel

KV_MEMORY_FRACTION = 0.8  # of the machine's memory (Metal's recommended working set on a Mac)


def machine_memory_bytes() -> int:
    """What mlx may use: Metal's recommended working set on a Mac, the physical memory elsewhere."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.device_info()["max_recommended_working_set_size"])
    except Exception:  # no mlx here (a control-plane host): the physical memory
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes one token adds to the model's key-value cache, measured once: a cache made by
    mlx-lm for the model, one token run through it, its arrays' bytes over their length."""
    known = getattr(loaded, "kv_bytes_per_token", None)
    if known is not None:
        return int(known)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(loaded.model)
    loaded.model(mx.array([[0]]), cache=cache)
    total = 0.0
    for layer in cache:
        for name in ("keys", "values"):
            array = getattr(layer, name, None)
            if isinstance(array, mx.array) and array.ndim == 4 and array.shape[2]:
                total += array.nbytes / array.shape[2]
    loaded.kv_bytes_per_token = per_token = max(1, round(total))
    return per_token


def model_context(loaded: LoadedModel) -> int | None:
    """The model's context length from its config (``max_position_embeddings``), if it says."""
    args = getattr(loaded.model, "args", None)
    value = getattr(args, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None
