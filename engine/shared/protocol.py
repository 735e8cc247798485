"""Every message on every socket, as msgspec Structs: the only wire format between ferry's processes.

Sockets (all ZMQ PUSH/PULL over IPC in the engine's private directory):
  frontend  --SchedulerInput-->  scheduler  --TokenBatch-->  detokenizer  --TextBatch-->  frontend
  scheduler --ProcessReady / ProcessError / ControlReply-->  frontend
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

from engine.shared.sampling import SamplingParams
from engine.shared.weight_protocol import TrainerOp


class Array(msgspec.Struct, array_like=True):
    """A tensor as raw bytes (row-major), so that no pickle crosses a socket."""

    data: bytes
    shape: list[int]
    dtype: str


class FinishReason(msgspec.Struct, omit_defaults=True):
    type: str  # "stop" | "length" | "abort"
    matched: Union[int, str, None] = None
    message: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "matched": self.matched}
        if self.message is not None:
            out["message"] = self.message
        return out


# ---- frontend -> scheduler ----


class ImageInput(msgspec.Struct, array_like=True):
    """One preprocessed image of a prompt: the vision tower's patches and where its tokens sit."""

    pixel_values: Array  # [num_patches, channels * temporal_patch * patch * patch], float32 or float16
    grid_thw: list[int]  # patches along time, height, width
    merge_size: int  # patches merged per side into one language-model token
    offset: int  # index in input_ids of the image's first token
    num_tokens: int  # its tokens: t * h * w / merge_size**2
    content_hash: int  # of the pixels: keys the image's tokens in the prefix cache


class GenerateRequest(msgspec.Struct):
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    return_hidden_states: bool = False
    images: list[ImageInput] = []  # in prompt order; their tokens are already expanded in input_ids
    embed: bool = False  # an embedding request: the prompt's pooled hidden state comes back (ReqExtras.embedding)
    # Its tokens go out as they come; False: all at once when it ends (a caller waiting for whole outputs),
    # so that the scheduler, the detokenizer and the frontend handle each request once, not every step.
    stream: bool = True


class GenerateBatch(msgspec.Struct, tag="generate"):
    """Requests submitted together (one message for a whole prompt list)."""

    reqs: list[GenerateRequest]


class AbortRequest(msgspec.Struct, tag="abort"):
    rids: list[str]


class ControlRequest(msgspec.Struct, tag="control"):
    """A call answered by a ControlReply with the same call_id (server info, flush cache, and a
    trainer's calls, whose arguments are `args`: weight_protocol.py)."""

    call_id: int
    op: str
    args: Optional[TrainerOp] = None


SchedulerInput = Union[GenerateBatch, AbortRequest, ControlRequest]


# ---- scheduler -> detokenizer ----


class DetokenizeSpec(msgspec.Struct, array_like=True):
    """What the detokenizer needs to know about a request, sent once with its first tokens."""

    rid: str
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    stop: list[str]
    no_stop_trim: bool
    return_text_in_logprobs: bool


class ReqExtras(msgspec.Struct, omit_defaults=True):
    """Optional per-request payloads: logprobs as (logprob, token_id) pairs, hidden states, an embedding."""

    input_token_logprobs: Optional[list[tuple[Optional[float], int]]] = None
    input_top_logprobs: Optional[list[list[tuple[float, int]]]] = None
    output_token_logprobs: Optional[list[tuple[float, int]]] = None
    output_top_logprobs: Optional[list[list[tuple[float, int]]]] = None
    hidden_states: Optional[list[Array]] = None
    embedding: Optional[Array] = None  # an embedding request's pooled vector [hidden], float32


class TokenBatch(msgspec.Struct, tag="tokens"):
    """New token ids of every request that advanced in one scheduler step (columnar)."""

    rids: list[str]
    new_token_ids: list[list[int]]
    finish: list[Optional[FinishReason]]
    prompt_tokens: list[int]
    cached_tokens: list[int]
    extras: list[Optional[ReqExtras]]
    new_specs: list[DetokenizeSpec] = []


# ---- detokenizer -> frontend ----


class TextBatch(msgspec.Struct, tag="text"):
    """Text deltas for the requests of one TokenBatch (columnar)."""

    rids: list[str]
    text_deltas: list[str]
    new_token_ids: list[list[int]]
    finish: list[Optional[FinishReason]]
    prompt_tokens: list[int]
    cached_tokens: list[int]
    extras: list[Optional[ReqExtras]]


class ProcessReady(msgspec.Struct, tag="ready"):
    role: str
    info: dict[str, Any]
    dp_rank: int = 0  # the scheduler replica it belongs to (data parallelism)


class ProcessError(msgspec.Struct, tag="error"):
    """A child's fatal error, with its traceback, for the caller to raise."""

    role: str
    message: str
    traceback: str
    dp_rank: int = 0  # the scheduler replica it belongs to: only that replica is lost when dp_size > 1


class ControlReply(msgspec.Struct, tag="reply"):
    call_id: int
    ok: bool
    payload: dict[str, Any]


FrontendInput = Union[TextBatch, ProcessReady, ProcessError, ControlReply]


class Codec:
    """Reused msgpack encoder and a decoder for one socket's message union."""

    def __init__(self, decode_type: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(decode_type)

    def encode(self, msg: msgspec.Struct) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, data: bytes) -> Any:
        return self._decoder.decode(data)
