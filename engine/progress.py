"""The progress bar of a batch `generate` call: prompts done, and input and output tokens per second.

It advances with output tokens, not only with finished prompts (a long batch would sit at 0/N until its
first prompt ends), by looking at the requests' states a few times a second from the engine's loop.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Optional

from tokenizer_proc.request_state import ReqState

_AUTO_MIN_PROMPTS = 32  # below this a batch is quick enough to need no bar
_REFRESH_S = 0.25


def wants_progress(use_tqdm: Optional[bool], num_prompts: int) -> bool:
    """use_tqdm True/False decides; None (the default): on for a batch of a few dozen prompts or more when
    stderr is a terminal (never in logs, pipes or notebooks' captured output)."""
    if use_tqdm is not None:
        return bool(use_tqdm)
    return num_prompts >= _AUTO_MIN_PROMPTS and sys.stderr.isatty()


class BatchProgress:
    """A tqdm bar over the batch's prompts with token rates; `watch()` runs until cancelled."""

    def __init__(self, states: list[ReqState]) -> None:
        from tqdm.auto import tqdm

        self.states = states
        self.start = time.perf_counter()
        self.bar: Any = tqdm(total=len(states), desc="generate", unit="prompt", dynamic_ncols=True)

    def refresh(self) -> None:
        done = sum(1 for s in self.states if s.finished)
        started = [s for s in self.states if s.output_ids or s.finished]  # their prompts are computed
        in_tokens = sum(s.prompt_tokens for s in started)
        out_tokens = sum(len(s.output_ids) for s in started)
        elapsed = max(time.perf_counter() - self.start, 1e-6)
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(
            f"input {in_tokens / elapsed:,.0f} tok/s, output {out_tokens / elapsed:,.0f} tok/s", refresh=True
        )

    async def watch(self) -> None:
        while True:
            self.refresh()
            await asyncio.sleep(_REFRESH_S)

    def close(self) -> None:
        self.refresh()
        self.bar.close()
