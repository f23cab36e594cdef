"""OpenAI's response and chunk shapes, built from a generation's reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from mlxserve.contract.serving import ReplyEnd, ReplyError, ReplyToken, ReplyTokens
from serving.requests import OpenAIError

_json = msgspec.json.Encoder()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


@dataclass
class Answer:
    """What a request has heard of its generation so far."""

    request_id: str
    model: str
    created: int
    logprobs: bool
    top_logprobs: int
    include_usage: bool
    tokens: list[ReplyToken] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: OpenAIError | None = None
    first_seen: bool = False
    done: bool = False

    def take(self, message: Any) -> None:
        if isinstance(message, ReplyTokens):
            self.tokens.extend(message.tokens)
        elif isinstance(message, ReplyEnd):
            self.finish_reason = message.finish_reason
            self.prompt_tokens, self.completion_tokens = message.prompt_tokens, message.completion_tokens
            self.done = True
        elif isinstance(message, ReplyError):
            self.error = generation_error(message)
            self.done = True

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


# What a worker refuses before generating because of the request itself: a client error (400),
# with OpenAI's code for a context too long.
_REFUSED = {
    "ContextLengthExceeded": "context_length_exceeded",
    "RequestTooLarge": "request_too_large",
    "InvalidPrompt": "invalid_prompt",
}


def generation_error(message: ReplyError) -> OpenAIError:
    """The client's error for a worker's: 400 for a request it refused, 504 past the time limit,
    500 for a failure."""
    if message.code in _REFUSED:
        param = None if message.code == "InvalidPrompt" else "max_tokens"
        return OpenAIError(400, message.message, param=param, code=_REFUSED[message.code])
    status = 504 if message.code == "RequestTimeout" else 500
    return OpenAIError(
        status, f"The generation failed ({message.code}): {message.message}", code=message.code
    )


def _head(answer: Answer, id_prefix: str, kind: str) -> dict[str, Any]:
    """What every response and chunk of a request begins with: its id (the generation's), kind, time,
    model."""
    return {
        "id": f"{id_prefix}-{answer.request_id}",
        "object": kind,
        "created": answer.created,
        "model": answer.model,
        "system_fingerprint": None,
    }


def _chat_logprob(token: ReplyToken) -> dict[str, Any]:
    return {
        "token": token.text,
        "logprob": token.logprob,
        "bytes": list(token.text.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in token.top or []],
    }


def chat_chunks(
    answer: Answer, token: ReplyToken | None, *, final: bool = False, usage: bool = False
) -> dict[str, Any]:
    """A ``chat.completion.chunk``: the role (no token), a token's delta, the last one (``final``)
    or the usage one (``choices: []``)."""
    chunk = _head(answer, "chatcmpl", "chat.completion.chunk")
    if usage:
        return {**chunk, "choices": [], "usage": answer.usage()}
    if final:
        choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": answer.finish_reason}
    elif token is None:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    else:
        logprobs = {"content": [_chat_logprob(token)], "refusal": None} if answer.logprobs else None
        choice = {"index": 0, "delta": {"content": token.text}, "logprobs": logprobs, "finish_reason": None}
    chunk["choices"] = [choice]
    if answer.include_usage:
        chunk["usage"] = None
    return chunk


def chat_response(answer: Answer) -> dict[str, Any]:
    logprobs = (
        {"content": [_chat_logprob(t) for t in answer.tokens], "refusal": None} if answer.logprobs else None
    )
    return {
        **_head(answer, "chatcmpl", "chat.completion"),
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(t.text for t in answer.tokens),
                    "refusal": None,
                },
                "logprobs": logprobs,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage(),
    }


def _completion_logprobs(tokens: list[ReplyToken], offset: int) -> dict[str, Any]:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top or []) for t in tokens],
        "text_offset": offsets,
    }


def completion_chunks(
    answer: Answer, token: ReplyToken | None, *, final: bool = False, usage: bool = False
) -> dict[str, Any]:
    chunk = _head(answer, "cmpl", "text_completion")
    if usage:
        return {**chunk, "choices": [], "usage": answer.usage()}
    if final or token is None:
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": answer.finish_reason}
    else:
        offset = sum(len(t.text) for t in answer.tokens)
        logprobs = _completion_logprobs([token], offset) if answer.logprobs else None
        choice = {"index": 0, "text": token.text, "logprobs": logprobs, "finish_reason": None}
    chunk["choices"] = [choice]
    if answer.include_usage:
        chunk["usage"] = None
    return chunk


def completion_response(answer: Answer) -> dict[str, Any]:
    return {
        **_head(answer, "cmpl", "text_completion"),
        "choices": [
            {
                "index": 0,
                "text": "".join(t.text for t in answer.tokens),
                "logprobs": _completion_logprobs(answer.tokens, 0) if answer.logprobs else None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage(),
    }
