"""A request's state inside the scheduler: its tokens, where its KV lives, and what is left to send."""

from __future__ import annotations

from typing import Optional

import numpy as np

from engine.protocol import Array, DetokenizeSpec, FinishReason, GenerateRequest, ReqExtras


class Request:
    def __init__(self, msg: GenerateRequest, seed: int) -> None:
        self.rid = msg.rid
        self.msg = msg
        self.sampling = msg.sampling
        self.input_ids = msg.input_ids
        self.output_ids: list[int] = []
        self.seed = seed
        self.row: Optional[int] = None  # row of req_to_token while admitted
        self.kv_len = 0  # tokens whose KV is in the pool
        self.cached_tokens = 0  # prompt tokens found in the prefix cache
        self.finish: Optional[FinishReason] = None
        self.announced = False  # the detokenizer has its DetokenizeSpec
        self.new_ids: list[int] = []  # generated since the last TokenBatch
        self.extras: Optional[ReqExtras] = None  # logprobs / hidden states since the last TokenBatch
        self._prompt_hidden: list[np.ndarray] = []
        stops = msg.sampling.stop
        # Enough tokens to hold any stop string, even one byte per token.
        self.stop_window = 4 * max((len(s.encode()) for s in stops), default=0) + 2

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.kv_len < len(self.input_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        return self.input_ids[start:] + self.output_ids[max(0, start - n) : end - n]

    def kv_still_needed(self) -> int:
        """Upper bound of the KV slots this request may still allocate."""
        return len(self.input_ids) + self.sampling.max_new_tokens - self.kv_len

    def detokenize_spec(self) -> DetokenizeSpec:
        s = self.sampling
        return DetokenizeSpec(
            rid=self.rid,
            skip_special_tokens=s.skip_special_tokens,
            spaces_between_special_tokens=s.spaces_between_special_tokens,
            stop=s.stop,
            no_stop_trim=s.no_stop_trim,
            return_text_in_logprobs=self.msg.return_text_in_logprobs,
        )

    def pending_extras(self) -> ReqExtras:
        if self.extras is None:
            self.extras = ReqExtras()
        return self.extras

    def add_hidden(self, rows: np.ndarray, prompt: bool) -> None:
        """Prompt rows gather until the prompt is done, then go out as one [prompt_len, hidden] array."""
        if prompt:
            self._prompt_hidden.append(rows)
            if self.prefilling:
                return
            rows = np.concatenate(self._prompt_hidden)
            self._prompt_hidden = []
        else:
            rows = rows[0]
        extras = self.pending_extras()
        extras.hidden_states = (extras.hidden_states or []) + [
            Array(data=rows.tobytes(), shape=list(rows.shape), dtype=str(rows.dtype))
        ]
