"""A small Llama-architecture MLX model with random weights, built on the spot.

No downloads: the tokenizer is a byte-level BPE trained here with
``tokenizers`` on text that ships with Python, and the weights are random.
``mlx_lm.load`` loads the result like any model on the Hub, so every code path
(load, stream_generate, detokenize, sampling) is the real one; only the text
is gibberish.
"""

from __future__ import annotations

import json
import pydoc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_ARGS: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 32768,  # room for any max_tokens the contract allows
    "tie_word_embeddings": True,
}
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus() -> Iterator[str]:
    """English text available offline: the docs of Python's builtins and a few modules."""
    import builtins
    import collections
    import itertools
    import json as json_module
    import pathlib
    import re

    for module in (builtins, collections, itertools, json_module, pathlib, re):
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)  # type: ignore[attr-defined]
        for line in text.splitlines():
            if line.strip():
                yield line


def _train_tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "model_max_length": DEFAULT_ARGS["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
                # A chat template, so chat requests are rendered as with a real chat model.
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2)
    )
    return int(tokenizer.get_vocab_size())


def create_demo_model(
    directory: str | Path, *, seed: int = 0, dtype: str = "float32", **overrides: Any
) -> Path:
    """Write the model to ``directory`` (created if missing) and return its path. ``dtype``
    (float32, float16, bfloat16) is that of its weights, hence of its logits: most published
    MLX models are bfloat16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _train_tokenizer(path)
    config = {**DEFAULT_ARGS, **overrides, "vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2}
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
