"""A generation in the contract: its request's fields (declared once, for the API's order and the
task a worker accepts) and the figures computed from its events, the one way wherever they are
shown. Imports nothing from Django."""

from __future__ import annotations

from typing import Annotated, Any, cast

import msgspec
from msgspec import Meta

from mlxserve.contract.events import Prompt

# -- figures of a generation, computed the one way wherever they are shown ---------------------


def tokens_per_second(tokens: int, seconds: float) -> float | None:
    """The decode rate: the tokens after the first over the ``seconds`` from the first token to
    the last (what ``generationCompleted``'s ``throughput`` carries). Where only a whole
    duration is known, ``seconds`` is that. None when it cannot be told."""
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else None


def time_to_first_token_ms(started_ms: int, first_token_ms: int) -> int | None:
    """From ``generationStarted`` to its attempt's first ``tokenGenerated``; None when the token
    is stamped before the start (two hosts' clocks)."""
    return first_token_ms - started_ms if first_token_ms >= started_ms else None


# -- generation requests (POST /api/generations/) --------------------------------


# The defaults of a generation request, wherever one is made (API, CLI, task, engine).
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 0.0  # 0 turns nucleus sampling off, as in mlx_lm.sample_utils.make_sampler


# A generation request's fields, declared once (``GenerationFields``): the API's order (below), the
# task a worker accepts (events.tasks.GenerationTask) and the engine's request
# (mlxserve.engine.engine.GenerationRequest) are each these fields and what their own hop adds.
OrderModel = Annotated[str, Meta(min_length=1, max_length=1000)]
OrderMaxTokens = Annotated[int, Meta(ge=1, le=32768)]
OrderTemperature = Annotated[float, Meta(ge=0, le=10)]
OrderTopP = Annotated[float, Meta(ge=0, le=1)]
OrderSeed = Annotated[int, Meta(ge=0, le=2**32 - 1)]


class GenerationFields(msgspec.Struct, frozen=True, kw_only=True):
    """What is to be generated and how it is sampled, from the API to the engine."""

    model: OrderModel
    prompt: Prompt
    max_tokens: OrderMaxTokens = DEFAULT_MAX_TOKENS
    temperature: OrderTemperature = DEFAULT_TEMPERATURE
    top_p: OrderTopP = DEFAULT_TOP_P
    seed: OrderSeed | None = None


def generation_fields(request: GenerationFields) -> dict[str, Any]:
    """A request's ``GenerationFields`` as keyword arguments, to make the next hop's from it."""
    return {name: getattr(request, name) for name in GenerationFields.__struct_fields__}


# ``POST /api/generations/``'s body: the same fields in camelCase (a subclass's rename reaches only
# the fields it declares, so they are declared again from ``GenerationFields``, not written).
GenerationOrder = cast(
    type[GenerationFields],
    msgspec.defstruct(
        "GenerationOrder",
        [
            (f.name, f.type) if f.required else (f.name, f.type, f.default)
            for f in msgspec.structs.fields(GenerationFields)
        ],
        bases=(GenerationFields,),
        rename="camel",
        forbid_unknown_fields=True,
        frozen=True,
        kw_only=True,
        module=__name__,
    ),
)
