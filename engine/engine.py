"""Engine: the public, in-process face of ferry. Starts the scheduler and detokenizer processes and
bridges sync and async callers (any thread, any event loop) to the engine's own loop thread."""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional, Union

from engine.loop_thread import LoopThread
from engine.processes import ChildProcesses
from engine.progress import BatchProgress, wants_progress
from engine.shared.args import EngineArgs, field_names
from engine.shared.child_process import freeze_startup_heap
from engine.shared.errors import EngineError
from engine.shared.protocol import GenerateRequest
from engine.weights import TrainerMethods
from tokenizer_proc.chat import chat_image_data, chat_prompts
from tokenizer_proc.constraints import needs_checking
from tokenizer_proc.images import image_processor_for
from tokenizer_proc.inputs import GenerateInput, InputIds, Limits, PreparedBatch, Prompt, SamplingArg, prepare
from tokenizer_proc.manager import TokenizerManager
from tokenizer_proc.request_state import ReqState

logger = logging.getLogger(__name__)


class Engine(TrainerMethods):
    """An LLM engine in three processes: this frontend, a GPU (or CPU) scheduler and a detokenizer.

    `Engine(model_path=None, **settings)`; settings are the fields of `engine.shared.args.EngineArgs`
    (dtype, device, context_length, max_running_requests, max_total_tokens, log_level, ...).
    With no model_path the default SmolLM2-135M-Instruct is used. `dp_size=N`: N scheduler replicas
    (each of tp_size ranks) behind this one frontend. `nnodes, node_rank, dist_init_addr`: tensor
    parallelism over machines; on node_rank > 0 the constructor runs that machine's ranks and returns
    only when node 0 shuts down. Returns once the model is loaded;
    raises `EngineError` carrying a child's traceback if start-up fails. Use it as a context manager
    or call `shutdown()`; it also shuts down at interpreter exit. Safe to use from any thread and
    from inside a running event loop (no nest_asyncio). Once started it freezes this process's heap
    (`gc.freeze()`, as vLLM's and SGLang's servers do): full collections then skip what is alive at
    start-up, which would otherwise pause every caller for ~0.1-0.3 s now and then.

    Outputs are dicts: {"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
    "completion_tokens", "cached_tokens", "e2e_latency", ...}}; finish_reason is
    {"type": "stop" | "length" | "abort", "matched": token id | stop string | None}.

    For RL trainers (engine/weights.py): update_weights_from_tensor / _from_disk / _from_distributed,
    init_weights_update_group / destroy_weights_update_group, get_weights_by_name,
    release_memory_occupation / resume_memory_occupation.
    """

    def __init__(self, model_path: Optional[str] = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(field_names()))
        if unknown:
            raise TypeError(f"Engine() got unknown setting(s) {unknown}; valid settings: {field_names()}")
        self._closed = True
        started = time.perf_counter()
        args = EngineArgs(model_path=model_path, **settings)
        _log_to_stderr(args.log_level)
        self.args = args.resolve()
        logger.info("starting ferry: %s on %s (%s)", self.args.model_path, self.args.device, self.args.dtype)
        if self.args.node_rank > 0:  # another machine's share of tensor parallelism: it serves nothing itself
            from engine.node_host import host_node_ranks

            host_node_ranks(self.args)  # returns once node 0 has shut down; then this Engine is shut down too
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.args.tokenizer_path)
        self._image_processor = image_processor_for(self.args.model_path, self.args.dtype)  # None: a text-only model
        self._shutdown_done = False  # from here on there is something to shut down
        self._loop = LoopThread(name="ferry-frontend")
        self._closed = False
        try:
            self._processes = ChildProcesses(self.args)
            self._manager: TokenizerManager = self._loop.run(self._make_manager())
            self._processes.start()
            info = self._loop.run(self._manager.wait_ready(self._processes.exits, self.args.startup_timeout))
        except BaseException:
            self.shutdown()
            raise
        self.server_info = info
        self._processes.worker_pids = info.get("tp_worker_pids", [])  # shutdown() waits for them too
        kv_pool_tokens = min(
            replica["kv_pool_tokens"] for replica in info["internal_states"]
        )  # what one request may hold
        self._limits = Limits(info["vocab_size"], self.args.context_length, kv_pool_tokens)
        atexit.register(_shutdown_ref, weakref.ref(self))
        # The frontend serves from the caller's process: its heap (torch, transformers, the tokenizer, and
        # whatever the application holds) out of the full collections that would stall every submission.
        freeze_startup_heap()
        logger.info(
            "engine ready in %.1fs: %s on %s, KV pool %d tokens, context %d",
            time.perf_counter() - started,
            self.args.model_path,
            info.get("device_name", self.args.device),
            info["kv_pool_tokens"],
            self.args.context_length,
        )

    async def _make_manager(self) -> TokenizerManager:
        return TokenizerManager(self._processes.endpoints, self._token_text, self.args.dp_size, self.args.tp_size)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- generation ----

    def generate(
        self,
        prompt: Prompt = None,
        sampling_params: SamplingArg = None,
        input_ids: InputIds = None,
        *,
        stream: bool = False,
        rid: Union[str, list[str], None] = None,
        return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None,
        return_text_in_logprobs: bool = False,
        return_hidden_states: Optional[bool] = None,
        image_data: Any = None,
        use_tqdm: Optional[bool] = None,
    ) -> Union[dict[str, Any], list[dict[str, Any]], Iterator[dict[str, Any]]]:
        """Generate for one prompt (returns a dict) or a list (returns a list, in order).

        Give exactly one of `prompt` (str or list of str) and `input_ids` (list[int] or list[list[int]]).
        `sampling_params` is a dict of `engine.SamplingParams` fields or a SamplingParams, or one per prompt.
        `stream=True` returns an iterator of chunks whose "text" is the new text only; the last chunk
        has meta_info.finish_reason set (for a list, each chunk carries its prompt's "index").
        Stopping the iteration early aborts the request. Logprobs (`return_logprob`) are the model's
        log-softmax over raw logits, before temperature, penalties and filtering; entries are
        (logprob, token_id, token_text or None). Hidden states are the final-normed states: first
        [prompt_len, hidden], then one [hidden] per decode step.

        Vision-language models take `image_data`: for one prompt an image or a list of images, for a
        list of prompts one entry per prompt (an image, a list of images or None). An image is a file
        path, bytes, a PIL image, a `data:image/...;base64,` URL or an http(s) URL. The prompt holds one
        `<|vision_start|><|image_pad|><|vision_end|>` per image, as the chat template writes it.

        `use_tqdm`: a progress bar (prompts done, input and output tok/s); default: 32+ prompts on a terminal.
        """
        call = GenerateInput(
            prompt=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            image_data=image_data,
            rid=rid,
            stream=stream,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
            return_hidden_states=return_hidden_states,
        )
        batch = self._prepare(call)
        if stream:
            return self._loop.iterate(self._manager.stream(batch.all(), with_index=not batch.single))
        states: list[ReqState] = []
        progress = wants_progress(use_tqdm, batch.size)
        try:
            for reqs in batch.slices:  # images are preprocessed here while earlier slices already run
                states += self._loop.run(self._submit(reqs, every_step=progress))
        except BaseException:
            self._loop.run(self._abort([s.rid for s in states]))  # a later image failed: nothing half-done
            raise
        outputs = self._loop.run(self._wait(states, progress))
        return outputs[0] if batch.single else outputs

    async def async_generate(
        self,
        prompt: Prompt = None,
        sampling_params: SamplingArg = None,
        input_ids: InputIds = None,
        *,
        stream: bool = False,
        rid: Union[str, list[str], None] = None,
        return_logprob: Union[bool, list[bool]] = False,
        logprob_start_len: Union[int, list[int], None] = None,
        top_logprobs_num: Union[int, list[int], None] = None,
        return_text_in_logprobs: bool = False,
        return_hidden_states: Optional[bool] = None,
        image_data: Any = None,
    ) -> Union[dict[str, Any], list[dict[str, Any]], AsyncIterator[dict[str, Any]]]:
        """The awaitable form of `generate`, from any event loop. With stream=True it returns an async
        iterator of chunks; cancelling the awaiting task or leaving the iteration aborts the request."""
        call = GenerateInput(
            prompt=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            image_data=image_data,
            rid=rid,
            stream=stream,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
            return_hidden_states=return_hidden_states,
        )
        # Fetching and preprocessing images, or checking a new grammar, must not block the caller's event loop.
        in_thread = image_data is not None or needs_checking(sampling_params)
        batch = await asyncio.to_thread(self._prepare, call) if in_thread else self._prepare(call)
        if stream:
            reqs = await asyncio.to_thread(batch.all) if in_thread else batch.all()
            return self._loop.iterate_async(self._manager.stream(reqs, with_index=not batch.single))
        states: list[ReqState] = []
        try:
            while True:
                reqs = await asyncio.to_thread(next, batch.slices, None) if in_thread else next(batch.slices, None)
                if reqs is None:
                    break
                states += await self._loop.run_async(self._submit(reqs))
        except BaseException:
            await self._loop.run_async(self._abort([s.rid for s in states]))
            raise
        outputs = await self._loop.run_async(self._wait(states, progress=False))
        return outputs[0] if batch.single else outputs

    # ---- embeddings ----

    def encode(
        self, prompt: Prompt = None, input_ids: InputIds = None, *, rid: Union[str, list[str], None] = None
    ) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """Embed one prompt (returns a dict) or a list of them (a list, in order), on an engine started
        with is_embedding=True. Give exactly one of `prompt` (str or list of str) and `input_ids`.
        Each output is {"embedding": [float] * hidden_size, "meta_info": {"id", "finish_reason",
        "prompt_tokens", "e2e_latency"}}: the prompt's final hidden states pooled as the model folder's
        sentence-transformers config says (modules.json), else the last token's, L2-normalised."""
        batch = self._prepare_encode(prompt, input_ids, rid)
        states = self._loop.run(self._submit(batch.all()))
        outputs = self._loop.run(self._wait(states, progress=False))
        return outputs[0] if batch.single else outputs

    async def async_encode(
        self, prompt: Prompt = None, input_ids: InputIds = None, *, rid: Union[str, list[str], None] = None
    ) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """The awaitable form of `encode`, from any event loop."""
        batch = self._prepare_encode(prompt, input_ids, rid)
        states = await self._loop.run_async(self._submit(batch.all()))
        outputs = await self._loop.run_async(self._wait(states, progress=False))
        return outputs[0] if batch.single else outputs

    def _prepare_encode(self, prompt: Prompt, input_ids: InputIds, rid: Union[str, list[str], None]) -> PreparedBatch:
        self._check_open()
        if not self.args.is_embedding:
            raise ValueError("encode() needs an embedding engine: Engine(model_path, is_embedding=True)")
        call = GenerateInput(
            prompt=prompt,
            input_ids=input_ids,
            sampling_params={"max_new_tokens": 0},
            rid=rid,
            return_hidden_states=False,
            embed=True,
        )
        return prepare(self.tokenizer, self._limits, call, self._image_processor)

    # ---- chat ----

    def chat(
        self, messages: Union[list[dict], list[list[dict]]], sampling_params: SamplingArg = None, **kwargs: Any
    ) -> Any:
        """Generate a reply to one conversation (a list of {"role", "content"} messages) or to a list of
        them, with the model's chat template; takes generate()'s keyword arguments (stream, ...). A
        content may be a list of OpenAI parts: {"type": "text", "text"} and, for vision-language models,
        {"type": "image_url", "image_url": {"url"}} (any image form generate() takes)."""
        prompt, images = self._chat_prompt(messages, kwargs)
        return self.generate(prompt, sampling_params, image_data=images, **kwargs)

    async def async_chat(
        self, messages: Union[list[dict], list[list[dict]]], sampling_params: SamplingArg = None, **kwargs: Any
    ) -> Any:
        """The awaitable form of `chat`."""
        prompt, images = self._chat_prompt(messages, kwargs)
        return await self.async_generate(prompt, sampling_params, image_data=images, **kwargs)

    def _chat_prompt(self, messages: Any, kwargs: dict[str, Any]) -> tuple[Union[str, list[str]], Any]:
        self._check_open()
        prompt = chat_prompts(self.tokenizer, messages)
        images = chat_image_data(messages)
        if kwargs.pop("image_data", None) is not None:
            raise TypeError("chat() takes its images in the messages' image_url content parts, not image_data")
        return prompt, images

    def _prepare(self, call: GenerateInput) -> PreparedBatch:
        self._check_open()
        if self.args.is_embedding:
            raise ValueError("this engine was started with is_embedding=True: it embeds with encode(), not generate()")
        if call.return_hidden_states is None:
            call.return_hidden_states = self.args.return_hidden_states
        return prepare(self.tokenizer, self._limits, call, self._image_processor)

    async def _submit(self, reqs: list[GenerateRequest], every_step: bool = False) -> list[ReqState]:
        """every_step: the tokens come as they are made even where the caller waits for whole outputs (a
        progress bar counts them)."""
        for req in reqs:
            req.stream = req.stream or every_step
        return self._manager.submit(reqs)

    async def _wait(self, states: list[ReqState], progress: bool) -> list[dict[str, Any]]:
        if not progress:
            return await self._manager.wait_all(states)
        progress = BatchProgress(states)
        watcher = asyncio.ensure_future(progress.watch())
        try:
            return await self._manager.wait_all(states)
        finally:
            watcher.cancel()
            progress.close()

    # ---- control ----

    def abort(self, rid: Union[str, list[str]]) -> None:
        """Abort running or waiting requests by id; their callers get finish_reason type "abort"."""
        self._check_open()
        rids = [rid] if isinstance(rid, str) else list(rid)
        self._loop.run(self._abort(rids))

    async def _abort(self, rids: list[str]) -> None:
        self._manager.abort(rids)

    def get_server_info(self) -> dict[str, Any]:
        """The resolved settings and the scheduler's live state (KV pool size and free slots, queues);
        `internal_states` has each scheduler replica's (dp_size of them: load, alive, its own figures)."""
        self._check_open()
        live = self._loop.run(self._manager.call("server_info"))
        return {**self.args.__dict__, **live}

    def flush_cache(self) -> dict[str, Any]:
        """Empty the prefix cache (of every scheduler replica) so later requests compute their prompts
        afresh. Only done when no request is running or waiting; returns {"ok": bool, "message": str}."""
        self._check_open()
        return self._loop.run(self._manager.call("flush_cache"))

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")

    # ---- lifecycle ----

    def shutdown(self) -> None:
        """Stop the child processes and the loop thread; safe to call more than once."""
        if getattr(self, "_shutdown_done", True):  # already shut down, or never started
            return
        self._shutdown_done = True
        self._closed = True
        manager = getattr(self, "_manager", None)
        if manager is not None:
            try:
                self._loop.run(manager.close())
            except Exception:  # shutting down: report, but keep stopping the rest
                logger.exception("closing the frontend failed")
        processes = getattr(self, "_processes", None)
        if processes is not None:
            processes.stop()
        if self._image_processor is not None:
            self._image_processor.close()
        self._loop.stop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass


def _shutdown_ref(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _log_to_stderr(level: str) -> None:
    """Unless the application set up logging itself, the frontend's lines go to stderr at `level`, as the
    child processes' do (vLLM and SGLang users expect to see loading and start-up as they happen)."""
    package = logging.getLogger("engine")
    ours = [h for h in package.handlers if h.get_name() == "ferry"]
    if logging.getLogger().handlers or (package.handlers and not ours):
        return
    if not ours:
        handler = logging.StreamHandler()
        handler.set_name("ferry")
        handler.setFormatter(logging.Formatter("[%(asctime)s frontend] %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    known = isinstance(logging.getLevelName(level.upper()), int)
    package.setLevel(level.upper() if known else logging.INFO)
