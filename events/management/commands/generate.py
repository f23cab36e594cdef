from __future__ import annotations

import json
import time
from typing import Any

import msgspec
from django.core.management.base import BaseCommand, CommandError

from events.generations import ModelNotServed, generation_queue
from events.responses import GenerationOut
from events.selectors import generation_detail, generation_latest_tokens
from mlxserve.contract.generations import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from mlxserve.contract.validation import ValidationFailed


class Command(BaseCommand):
    help = (
        "Queue a generation and stream its tokens to the terminal as they are stored, then print the "
        "summary. Needs a worker and the ingester running (make run starts both)."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--model",
            required=True,
            help="A registered model: its name, or the directory or cached repo id it was registered with.",
        )
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
        parser.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
        parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--timeout", type=float, default=300.0, help="Seconds to wait for the end.")

    def handle(self, *args: Any, **options: Any) -> None:
        order: dict[str, Any] = {
            "model": options["model"],
            "prompt": options["prompt"],
            "maxTokens": options["max_tokens"],
            "temperature": options["temperature"],
            "topP": options["top_p"],
        }
        if options["seed"] is not None:
            order["seed"] = options["seed"]
        deadline = time.monotonic() + options["timeout"]
        waiting_said = False
        while True:
            try:
                generation = generation_queue(data=order)
                break
            except ValidationFailed as exc:
                raise CommandError(json.dumps(exc.as_error())) from None
            except ModelNotServed as exc:
                # A worker just started (make run) claims its models within a few seconds: wait
                # for one, saying so, up to the timeout.
                if time.monotonic() >= deadline:
                    raise CommandError(str(exc)) from None
                if not waiting_said:
                    self.stderr.write(f"{exc}: waiting for a worker that serves it ...")
                    waiting_said = True
                time.sleep(0.5)
        self.stderr.write(f"Queued generation {generation.id}; waiting for a worker ...")
        shown_seq, shown_attempt = 0, 0
        while time.monotonic() < deadline:
            attempt, tokens = generation_latest_tokens(generation_id=generation.id)
            if shown_attempt and attempt != shown_attempt:
                self.stderr.write("\n[the worker restarted the generation: a new attempt]")
                shown_seq = 0
            shown_attempt = attempt
            for seq, token in tokens:
                if seq <= shown_seq:
                    continue
                if seq != shown_seq + 1:
                    break  # wait until the gap is stored, to print in order
                self.stdout.write(token, ending="")
                self.stdout.flush()
                shown_seq = seq
            detail = generation_detail(generation_id=generation.id)
            if detail and detail.state in ("completed", "failed") and shown_seq >= detail.tokens:
                self.stdout.write("")
                self._summary(detail)
                if detail.state == "failed":
                    raise CommandError(f"Generation failed: {msgspec.json.encode(detail.error).decode()}")
                return
            time.sleep(0.1)
        raise CommandError(
            f"Timed out after {options['timeout']:.0f}s: is a worker running? Is the ingester?"
        )

    def _summary(self, detail: GenerationOut) -> None:
        ttft = detail.time_to_first_token_ms
        tps = detail.tokens_per_second
        self.stderr.write(
            f"--\n{detail.state}: {detail.tokens} tokens"
            + (f", time to first token {ttft:.0f} ms" if ttft is not None else "")
            + (f", {tps:.1f} tokens/s" if tps is not None else "")
            + (f", attempt {detail.attempt}" if detail.attempt > 1 else "")
        )
