"""A request's state inside the scheduler: its tokens, where its KV lives, and what is left to send."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from engine.shared.protocol import Array, DetokenizeSpec, FinishReason, GenerateRequest, ReqExtras
from scheduler_proc.multimodal import RequestImages


class Request:
    def __init__(self, msg: GenerateRequest, seed: int) -> None:
        self.rid = msg.rid
        self.msg = msg
        self.sampling = msg.sampling
        self.input_ids = msg.input_ids
        self.images = RequestImages(msg.images, msg.input_ids) if msg.images else None
        self.output_ids: list[int] = []
        self.seed = seed
        self.row: Optional[int] = None  # row of req_to_token while admitted
        self.kv_len = 0  # tokens whose KV is in the pool
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.shared_len = 0  # leading KV slots owned by the prefix cache: never freed by this request
        self.cache_node: Any = None  # prefix-cache node ending the path this request locks
        self.retracted = False  # sent back to the waiting queue at least once (KV ran short)
        self.replay_until = 0  # positions below this were computed before a retraction: extras went out
        self.finish: Optional[FinishReason] = None
        self.error: Optional[str] = None  # a failure of this request alone; it ends at its next check
        self.announced = False  # the detokenizer has its DetokenizeSpec
        self.new_ids: list[int] = []  # generated since the last TokenBatch
        # Overlap scheduling: tokens sampled by launched steps and not read yet (in_flight.py counts
        # them). Never more than one when the scheduler looks: step N is read right after N+1 is launched.
        self.pending = 0
        self.closed = False  # its finish has been sent: nothing more goes out
        self.extras: Optional[ReqExtras] = None  # logprobs / hidden states since the last TokenBatch
        self.grammar: Any = None  # a constrained request's xgrammar.GrammarMatcher, once compiled (grammar.py)
        self._prompt_hidden: list[np.ndarray] = []
        self.pooled: Any = None  # an embedding request's pooled hidden states so far (pooling.py)
        # Decodes with nothing owed per position (logprobs, hidden states) and no images: step.py's fast path.
        owes = msg.return_logprob or msg.return_hidden_states or msg.embed
        self.plain = not owes and self.images is None and msg.sampling.max_new_tokens > 0
        stops = msg.sampling.stop
        # Enough tokens to hold any stop string, even one byte per token.
        self.stop_window = 4 * max((len(s.encode()) for s in stops), default=0) + 2

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def total_tokens(self) -> int:
        """Tokens including one sampled by the step in flight."""
        return len(self.input_ids) + len(self.output_ids) + self.pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.pending

    def surely_done(self, context_length: int) -> bool:
        """Whether the pending token ends the request by length alone, so no step needs it again."""
        generated = len(self.output_ids) + self.pending
        return generated >= self.sampling.max_new_tokens or len(self.input_ids) + generated >= context_length

    @property
    def prefilling(self) -> bool:
        """Computing tokens it already has (its prompt; prompt + output after a retraction), as
        opposed to decoding its last sampled token."""
        generated = len(self.output_ids)  # read every step for every request: no nested properties
        return self.kv_len < len(self.input_ids) + generated - (1 if generated else 0)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        return self.input_ids[start:] + self.output_ids[max(0, start - n) : end - n]

    def cache_tokens(self, start: int, end: int) -> list[int]:
        """The prefix cache's keys of tokens [start, end): the tokens, with image tokens keyed by their image."""
        if self.images is None:
            return self.tokens(start, end)
        keys, n = self.images.cache_ids, len(self.input_ids)
        if end <= n:
            return keys[start:end]
        return keys[start:] + self.output_ids[max(0, start - n) : end - n]

    def max_kv_tokens(self) -> int:
        """KV slots this request holds at most: prompt + max_new_tokens."""
        return len(self.input_ids) + self.sampling.max_new_tokens

    def exceeds(self, capacity: int) -> Optional[str]:
        """Why this request can never run in a KV pool of `capacity` slots, or None."""
        if self.max_kv_tokens() <= capacity:
            return None
        prompt, asked = len(self.input_ids), self.sampling.max_new_tokens
        return f"prompt ({prompt} tokens) + max_new_tokens ({asked}) exceeds the KV pool ({capacity} tokens)"

    def max_prefix_len(self) -> int:
        """Leading tokens that may come from the prefix cache: never the last one (its logits are
        needed), nor positions whose per-token outputs (input logprobs, prompt hidden states) are
        still owed."""
        owed_from = self.num_tokens
        if self.msg.return_hidden_states or self.msg.embed:  # every prompt row is owed (embed: pooled)
            owed_from = 0
        elif self.msg.return_logprob and self.msg.logprob_start_len >= 0:
            owed_from = max(self.msg.logprob_start_len, 1) - 1  # the position scoring the first asked token
        return max(0, min(self.num_tokens - 1, max(owed_from, self.replay_until)))

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

    def add_hidden(self, rows: np.ndarray, prompt: bool, prompt_done: bool) -> None:
        """Prompt rows gather until the prompt is done, then go out as one [prompt_len, hidden] array."""
        if prompt:
            self._prompt_hidden.append(rows)
            if not prompt_done:
                return
            rows = np.concatenate(self._prompt_hidden)
            self._prompt_hidden = []
        else:
            rows = rows[0]
        extras = self.pending_extras()
        extras.hidden_states = (extras.hidden_states or []) + [
            Array(data=rows.tobytes(), shape=list(rows.shape), dtype=str(rows.dtype))
        ]
