"""Grammars of constrained requests (sampling_params json_schema, regex, ebnf): compiled against the
tokenizer by xgrammar in a worker thread, so that compiling never holds up a step, and cached by their
text, so that the n samples of a prompt and requests repeating a schema compile it once. A constrained
request waits here until its grammar is compiled, then joins the scheduler's waiting queue with a matcher
(req.grammar) that follows its output token by token.

The masks built from the matchers are grammar_mask.py's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from engine.shared.args import EngineArgs
from engine.shared.errors import native_message
from scheduler_proc.request import Request

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # (kind, text): kind is one of engine.shared.sampling.CONSTRAINT_FIELDS


class GrammarQueue:
    """Constrained requests whose grammar is being compiled, and the cache of compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], args: EngineArgs) -> None:
        self.tokenizer = tokenizer
        # The tokenizer's ids, the grammars' vocabulary: a model's logits may be wider (padding, no tokens;
        # grammar_mask.py forbids those to constrained rows).
        self.token_vocab = min(vocab_size, max(tokenizer.get_vocab().values()) + 1)
        self.stop_token_ids = stop_token_ids  # what the matcher takes as the end once the grammar is complete
        self.cache_size = args.grammar_cache_size
        # Any whitespace between JSON elements (SGLang's default), or none but ", " and ": ".
        self.json_any_whitespace = not args.constrained_json_disable_any_whitespace
        self.cache: OrderedDict[Key, Future] = OrderedDict()  # least recently used first
        self.compiling: list[tuple[Request, Future]] = []
        self.num_compiled = 0
        self._executor: Optional[ThreadPoolExecutor] = None  # started by the first constrained request
        self._compiler: Any = None  # xgrammar.GrammarCompiler, made in the worker thread

    def __len__(self) -> int:
        return len(self.compiling)

    def add(self, req: Request) -> None:
        """Start compiling req's grammar, or share a compile (done or under way) of the same text."""
        key = req.sampling.constraint
        assert key is not None, req.rid
        future = self.cache.get(key)
        if future is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
            future = self._executor.submit(self._compile, key)
            self.cache[key] = future
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)  # a request holding its future keeps it
        else:
            self.cache.move_to_end(key)
        self.compiling.append((req, future))

    def ready(self) -> list[tuple[Request, Optional[str]]]:
        """The requests whose grammar is compiled now, in arrival order: each with its matcher set on
        req.grammar and None, or with what went wrong."""
        if not any(future.done() for _, future in self.compiling):
            return []
        import xgrammar

        done: list[tuple[Request, Optional[str]]] = []
        still: list[tuple[Request, Future]] = []
        for req, future in self.compiling:
            if not future.done():
                still.append((req, future))
                continue
            error = future.exception()
            if error is None:
                req.grammar = xgrammar.GrammarMatcher(future.result())
                done.append((req, None))
            else:
                kind = req.sampling.constraint[0]
                done.append((req, f"sampling_params.{kind} could not be compiled: {native_message(error)}"))
        self.compiling = still
        return done

    def remove(self, rids: set[str]) -> list[Request]:
        """Take the requests with these ids out (aborted while their grammar compiles)."""
        gone = [req for req, _ in self.compiling if req.rid in rids]
        self.compiling = [(req, future) for req, future in self.compiling if req.rid not in rids]
        return gone

    def info(self) -> dict[str, int]:
        return {
            "num_compiling_grammars": len(self.compiling),
            "grammars_compiled": self.num_compiled,
            "grammar_cache_entries": len(self.cache),
        }

    def _compile(self, key: Key) -> Any:
        """In the worker thread: the grammar compiled against the tokenizer (xgrammar releases the GIL)."""
        import xgrammar

        if self._compiler is None:  # the tokenizer's info takes a moment: not on the scheduler's thread
            info = xgrammar.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.token_vocab, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # the cache is ours
        kind, text = key
        if kind == "json_schema":
            compiled = self._compiler.compile_json_schema(text, any_whitespace=self.json_any_whitespace)
        elif kind == "regex":
            compiled = self._compiler.compile_regex(text)
        else:
            compiled = self._compiler.compile_grammar(text)
        self.num_compiled += 1
        logger.info("compiled a %s grammar (%d characters)", kind, len(text))
        return compiled
