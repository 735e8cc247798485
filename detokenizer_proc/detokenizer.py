"""The detokenizer's loop: one TokenBatch in, one TextBatch out, batch-decoding every request at once."""

from __future__ import annotations

import logging

import zmq

from detokenizer_proc.incremental import DecodeState
from engine.shared.args import EngineArgs
from engine.shared.child_process import freeze_startup_heap
from engine.shared.ipc import Endpoints, pull_socket, push_socket
from engine.shared.protocol import Codec, ProcessReady, TextBatch, TokenBatch
from engine.shared.text import TextDecoder

logger = logging.getLogger(__name__)


class Detokenizer:
    """Keeps a DecodeState per live request and turns token batches into text batches."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoder = TextDecoder(tokenizer)
        self.states: dict[str, DecodeState] = {}

    def process(self, batch: TokenBatch) -> TextBatch:
        for spec in batch.new_specs:
            self.states[spec.rid] = DecodeState(spec)
        states = [self.states[rid] for rid in batch.rids]
        for state, ids in zip(states, batch.new_token_ids):
            state.ids.extend(ids)
        deltas = self._decode(states, batch)
        for rid, finish in zip(batch.rids, batch.finish):
            if finish is not None:
                del self.states[rid]
        return TextBatch(
            rids=batch.rids,
            text_deltas=deltas,
            new_token_ids=batch.new_token_ids,
            finish=batch.finish,
            prompt_tokens=batch.prompt_tokens,
            cached_tokens=batch.cached_tokens,
            extras=batch.extras,
        )

    def _decode(self, states: list[DecodeState], batch: TokenBatch) -> list[str]:
        # Group by decode options so each group is two batch_decode calls, not two calls per request.
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, state in enumerate(states):
            key = (state.spec.skip_special_tokens, state.spec.spaces_between_special_tokens)
            groups.setdefault(key, []).append(i)
        for (skip, spaces), members in groups.items():
            windows = [states[i].windows() for i in members]
            prefix_texts = self.decoder.decode([w[0] for w in windows], skip, spaces)
            full_texts = self.decoder.decode([w[1] for w in windows], skip, spaces)
            for i, prefix_text, full_text in zip(members, prefix_texts, full_texts):
                states[i].advance(prefix_text, full_text, final=batch.finish[i] is not None)
        deltas = []
        for state, finish in zip(states, batch.finish):
            matched = finish.matched if finish is not None and isinstance(finish.matched, str) else None
            deltas.append(state.take_delta(finish is not None, matched))
        return deltas


def run_detokenizer(args: EngineArgs, endpoints: Endpoints, context: zmq.Context) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    detokenizer = Detokenizer(tokenizer)
    receiver = pull_socket(context, endpoints.detokenizer)
    sender = push_socket(context, endpoints.frontend)
    in_codec, out_codec = Codec(TokenBatch), Codec(TextBatch | ProcessReady)
    freeze_startup_heap()  # the tokenizer's objects out of every full collection's walk
    sender.send(out_codec.encode(ProcessReady(role="detokenizer", info={})))
    while True:
        batch = in_codec.decode(receiver.recv())
        sender.send(out_codec.encode(detokenizer.process(batch)))
