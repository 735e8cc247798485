"""When a request is done: length, EOS, stop token ids, stop strings (found even across tokens), its grammar
complete."""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from engine.shared.args import EngineArgs, read_model_config
from engine.shared.protocol import FinishReason
from engine.shared.text import TextDecoder
from scheduler_proc.request import Request

logger = logging.getLogger(__name__)


class FinishChecker:
    def __init__(self, args: EngineArgs) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
        self.decoder = TextDecoder(self.tokenizer)  # the detokenizer's decoding, so both see the same text
        self.context_length = args.context_length
        self.eos_ids = sorted(_eos_ids(args.model_path, self.tokenizer))

    def check(self, req: Request) -> Optional[FinishReason]:
        """Called after each new token; stop conditions wait for min_new_tokens. A failure while
        checking one request (or one recorded earlier in its step) ends that request alone."""
        if req.error is None:
            try:
                return self._check(req)
            except Exception as exc:
                logger.exception("finish check of request %s failed", req.rid)
                req.error = f"{type(exc).__name__}: {exc}"
        return FinishReason(type="abort", message=f"internal error: {req.error}")

    def _check(self, req: Request) -> Optional[FinishReason]:
        params = req.sampling
        token = req.output_ids[-1]
        count = len(req.output_ids)
        # Complete, and its end token taken: a matcher ends only by taking one of its stop tokens (the EOS
        # ids, grammar.py), so the others skip the call (256 of them a step cost the host 0.1-0.3 ms).
        if req.grammar is not None and token in self.eos_ids and req.grammar.is_terminated():
            return FinishReason(type="stop", matched=token)
        if count >= params.min_new_tokens:
            if token in params.stop_token_ids:
                return FinishReason(type="stop", matched=token)
            if not params.ignore_eos and token in self.eos_ids:
                return FinishReason(type="stop", matched=token)
            if params.stop:
                matched = self._stop_string(req)
                if matched is not None:
                    return FinishReason(type="stop", matched=matched)
        if count >= params.max_new_tokens or req.num_tokens >= self.context_length:
            return FinishReason(type="length", matched=None)
        return None

    def _stop_string(self, req: Request) -> Optional[str]:
        params = req.sampling
        tail_ids = req.output_ids[-req.stop_window :]
        tail = self.decoder.decode([tail_ids], params.skip_special_tokens, params.spaces_between_special_tokens)[0]
        found = [(tail.find(s), s) for s in req.sampling.stop if s in tail]
        return min(found)[1] if found else None


def _eos_ids(model_dir: str, tokenizer) -> set[int]:
    ids: set[int] = set()

    def add(value) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))

    add(read_model_config(model_dir).get("eos_token_id"))
    path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            add(json.load(f).get("eos_token_id"))
    add(tokenizer.eos_token_id)
    return ids
