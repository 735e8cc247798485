"""Token ids to text with a request's decode options, shared by the detokenizer and the finish check."""

from __future__ import annotations

from typing import Any, Union


class TextDecoder:
    """Batch-decodes id lists as `skip_special_tokens` / `spaces_between_special_tokens` ask.

    HF fast tokenizers ignore `spaces_between_special_tokens`; with False we join added tokens and
    the text between them with no space, as HF's slow tokenizers did (vLLM and SGLang users expect
    it). With True the tokenizer's own decoding stands (byte-level tokenizers put no space there).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        # id -> (text, is special) of every added token (special tokens and user-added words)
        self.added: dict[int, tuple[str, bool]] = {
            i: (getattr(t, "content", str(t)), bool(getattr(t, "special", True))) for i, t in added.items()
        }
        # The Rust tokenizer decodes a whole batch in one call; transformers' batch_decode first walks every
        # id in Python (most of the detokenizer's time at batch 512). Its clean-up of spaces is all it adds:
        # a tokenizer that asks for that keeps the transformers path.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode_batch = backend.decode_batch if backend is not None and not cleans else None

    def _batch_decode(self, id_lists: list[list[int]], skip_special_tokens: bool) -> list[str]:
        if self._decode_batch is not None:
            return self._decode_batch(id_lists, skip_special_tokens=skip_special_tokens)
        return self.tokenizer.batch_decode(id_lists, skip_special_tokens=skip_special_tokens)

    def decode(
        self, id_lists: list[list[int]], skip_special_tokens: bool, spaces_between_special_tokens: bool
    ) -> list[str]:
        if spaces_between_special_tokens or not self.added:
            return self._batch_decode(id_lists, skip_special_tokens)
        runs: list[list[int]] = []  # text runs between added tokens, decoded together in one call
        layouts: list[list[Union[int, str]]] = []  # per id list: run indices and added tokens' text
        for ids in id_lists:
            layout: list[Union[int, str]] = []
            run: list[int] = []
            for token in ids:
                entry = self.added.get(token)
                if entry is None:
                    run.append(token)
                elif not (skip_special_tokens and entry[1]):  # a skipped token leaves the run whole
                    if run:
                        layout.append(len(runs))
                        runs.append(run)
                        run = []
                    layout.append(entry[0])
            if run:
                layout.append(len(runs))
                runs.append(run)
            layouts.append(layout)
        texts = self._batch_decode(runs, skip_special_tokens) if runs else []
        return ["".join(texts[p] if isinstance(p, int) else p for p in layout) for layout in layouts]
