"""The scheduler's event loop: receive requests, pick the next step's tokens, run it, send the tokens.

Every step is one forward pass over all running requests: decoding requests add one token each and
requests still prefilling add a chunk of their prompt, so long prompts never stall decoding. Waiting
requests are admitted while the KV pool is expected to hold them (policy.py), starting from their
longest cached prefix (cache_manager.py); when a step would not fit after all, the requests with the
least progress are retracted to the waiting queue, keeping their tokens, and resume later.

Sockets are scheduler_io.py's, the overlap state in_flight.py's, the device work model_runner.py's.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections import deque
from typing import Optional

import zmq

from engine.shared.args import EngineArgs
from engine.shared.child_process import freeze_startup_heap
from engine.shared.ipc import Endpoints
from engine.shared.pooling import read_pooling_config
from engine.shared.protocol import AbortRequest, ControlRequest, FinishReason, GenerateBatch
from scheduler_proc.cache_manager import CacheManager
from scheduler_proc.control import ControlCalls
from scheduler_proc.finish import FinishChecker
from scheduler_proc.grammar import GrammarQueue
from scheduler_proc.grammar_mask import TokenMasks
from scheduler_proc.in_flight import InFlight
from scheduler_proc.model_runner import ModelRunner
from scheduler_proc.policy import NewTokenEstimate, PrefillingRequests, order_waiting, retraction_order
from scheduler_proc.pooling import Pooler
from scheduler_proc.radix_cache import create_prefix_cache
from scheduler_proc.request import Request
from scheduler_proc.scheduler_io import Message, SchedulerIO
from scheduler_proc.step import Step, build_step
from scheduler_proc.step_outputs import read_step_outputs
from scheduler_proc.tp.group import TPGroup
from scheduler_proc.tp.workers import TPWorkers, start_tensor_parallel
from scheduler_proc.trainer_ops import TrainerOps

logger = logging.getLogger(__name__)

_RETRACT_HEADROOM_STEPS = 4  # retract until the rest can decode this many steps: one retraction a step would thrash
_GRAMMAR_POLL_MS = 2  # idle but for grammars compiling: how often to look whether one is done


class Scheduler(ControlCalls):
    """The loop and the scheduling policy of rank 0: which requests run, which wait, which retract."""

    def __init__(
        self,
        args: EngineArgs,
        endpoints: Endpoints,
        context: zmq.Context,
        tp: Optional[TPGroup] = None,
        tp_workers: Optional[TPWorkers] = None,
    ) -> None:
        self.args = args
        self.tp_workers = tp_workers
        self.runner = ModelRunner(args, tp)
        self.pool = self.runner.pool
        self.finish_checker = FinishChecker(args)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted, in arrival order
        # Unseeded requests draw their seeds here: each replica (data parallelism) its own sequence.
        self.rng = random.Random(
            args.random_seed if endpoints.dp_rank == 0 else f"{args.random_seed}/{endpoints.dp_rank}"
        )
        self.io = SchedulerIO(endpoints, context)
        self.outputs: list[Request] = []  # requests that may have news for this turn's TokenBatch
        limit = args.chunked_prefill_size if args.chunked_prefill_size > 0 else None
        self.step_prefill_tokens = min(args.max_prefill_tokens, limit) if limit else args.max_prefill_tokens
        self.chunking = limit is not None
        self.cache = CacheManager(self.pool, create_prefix_cache(args.disable_radix_cache, self.pool))
        self.estimate = NewTokenEstimate()
        self.num_retractions = 0
        self.overlap = not args.disable_overlap_schedule
        self.in_flight: Optional[InFlight] = None  # the launched step whose outputs are not read yet
        self.pooler = Pooler(read_pooling_config(args.model_path)) if args.is_embedding else None
        self.trainer = TrainerOps(self.runner)  # weight updates and memory release, between steps
        checker, vocab_size = self.finish_checker, self.runner.shape.vocab_size
        self.grammars = GrammarQueue(checker.tokenizer, vocab_size, checker.eos_ids, args)
        self.masks = TokenMasks(self.pool.max_requests, self.grammars.token_vocab, self.runner.device, vocab_size)

    # ---- the loop ----

    def run_forever(self) -> None:
        freeze_startup_heap()
        self.io.send_ready(self.server_info())
        while True:
            self.iterate()

    def iterate(self) -> None:
        """One turn of the loop. With overlap, step N+1 is scheduled and queued on the device before
        step N's outputs are read, so the host work between steps hides behind the device's."""
        mark = self.runner.profiler.mark  # with profile_steps: each part's host time (step_profile.py)
        mark(None)
        idle = not (self.waiting or self.running or self.in_flight) or self.trainer.holds_requests
        for msg in self.io.receive(block=idle, timeout_ms=_GRAMMAR_POLL_MS if self.grammars else None):
            self.handle(msg)
        self.admit_compiled()
        mark("receive")
        withheld = self.in_flight.rows_to_withhold() if self.in_flight is not None else []
        with self.pool.rows_withheld(withheld):
            step = self.schedule()
        mark("schedule")
        # A constrained step in flight samples now: its forward ran while this turn scheduled.
        if self.in_flight is not None and not self.sample(self.in_flight) and step is not None:
            self.unbuild(step)
            step = None
        mark("sample")
        launched = self.launch(step) if step is not None else None
        mark("launch")
        to_read = launched
        if self.overlap:  # read the step launched last turn; this one's outputs wait for the next
            to_read, self.in_flight = self.in_flight, launched
        if to_read is not None:
            self.process(to_read)
        self.send_outputs()
        self.runner.profiler.turn_done("send")

    def handle(self, msg: Message) -> None:
        """New requests join the waiting queue, aborts end theirs, control calls are answered."""
        if isinstance(msg, GenerateBatch):
            for req in msg.reqs:
                seed = req.sampling.seed if req.sampling.seed is not None else self.rng.getrandbits(62)
                if req.sampling.constraint is None:
                    self.waiting.append(Request(req, seed))
                else:  # waits for its grammar, compiled off this thread
                    self.grammars.add(Request(req, seed))
        elif isinstance(msg, AbortRequest):
            self.abort(set(msg.rids), "aborted by the caller")
        elif isinstance(msg, ControlRequest):
            self.answer_control(msg)

    def admit_compiled(self) -> None:
        """Constrained requests whose grammar is compiled join the waiting queue (or end, if it failed)."""
        for req, error in self.grammars.ready():
            if error is None:
                self.waiting.append(req)
            else:
                self.finish(req, FinishReason(type="abort", message=error))

    def send_outputs(self) -> None:
        """The turn's one TokenBatch: every request with news since the last."""
        self.io.send_outputs(self.outputs)
        self.outputs = []

    # ---- scheduling ----

    def schedule(self) -> Optional[Step]:
        """Every running request gets its next tokens; waiting requests join while rows, the step's
        token budget and the KV estimate allow."""
        if not self.running and not self.waiting:
            self.estimate.idle()
            return None
        if self.trainer.holds_requests:  # memory released: requests wait for resume_memory_occupation
            return None
        self.retract_if_short()
        entries, budget = self.running_entries()
        self.admit_waiting(entries, budget)
        if not entries:
            if len(self.running) > 1 and self.in_flight is None:  # none can advance: free room rather than spin
                self.retract(min(self.running, key=retraction_order), "no request can advance")
            return None
        self.cache.make_free(sum(n for _, n in entries))
        return build_step(entries, self.pool, self.finish_checker.eos_ids)

    def running_entries(self) -> tuple[list[tuple[Request, int]], int]:
        """(request, new tokens) of the running requests: one to decode, or the next chunk of what it
        still has to prefill as far as the step's budget and the KV pool allow; and the budget left."""
        entries: list[tuple[Request, int]] = []
        budget = self.step_prefill_tokens
        prefilling = [r.prefilling for r in self.running]  # read once: this runs every step for every request
        room = self.cache.available() - prefilling.count(False)
        for req, prefills in zip(self.running, prefilling):
            if not prefills:
                # With overlap, one whose pending token ends it (or with nothing to sample) sits this out.
                if not req.surely_done(self.args.context_length):
                    entries.append((req, 1))
                continue
            remaining = req.num_tokens - req.kv_len
            n = min(remaining, budget, room) if self.chunking else (remaining if remaining <= room else 0)
            if n > 0:
                entries.append((req, n))
                budget -= n
                room -= n
        return entries, budget

    def admit_waiting(self, entries: list[tuple[Request, int]], budget: int) -> None:
        """Admit waiting requests (policy order) from their cached prefix, adding their first chunk to
        entries, while the KV pool is expected to hold them beside what running requests will need."""
        if not self.waiting or budget <= 0 or self.pool.num_free_rows() == 0:
            return
        reserved = sum(self.estimate.reserved(r) for r in self.running)
        prefilling = PrefillingRequests(r for r in self.running if r.prefilling)
        for req, match in order_waiting(self.waiting, self.args.schedule_policy, self.cache.match):
            if budget <= 0 or self.pool.num_free_rows() == 0:
                break
            if req.pending:  # retracted while its last token was in flight: admitted once it is read
                continue
            too_long = req.exceeds(self.pool.capacity)
            if too_long is not None:
                self.waiting.remove(req)
                self.finish(req, FinishReason(type="abort", message=too_long))
                continue
            match = match if match is not None else self.cache.match(req)
            if self.cache.enabled and prefilling.worth_waiting_for(req, len(match)):
                continue
            extend = req.num_tokens - len(match)
            if not self.chunking and entries and extend > budget:
                break
            self.cache.lock(match)  # before counting what is available: the prefix is not evictable now
            need = extend + self.estimate.future_tokens(req)
            if self.cache.available() - reserved < need:
                self.cache.unlock(match)
                break
            self.waiting.remove(req)
            self.cache.admit(req, match)
            self.runner.sampling.admit(req.row, req.sampling, req.seed, req.input_ids, req.output_ids)
            if not req.retracted:
                req.cached_tokens = len(match)
            self.running.append(req)
            n = min(extend, budget) if self.chunking else extend
            entries.append((req, n))
            budget -= n
            reserved += need
            if req.prefilling:
                prefilling.add(req)

    # ---- memory pressure ----

    def retract_if_short(self) -> None:
        """When the next step's decode tokens would not fit in the KV pool even after evicting the
        cache, retract the requests with the least progress back to the front of the waiting queue."""
        if not self.running:
            return
        available = self.cache.available()
        # A step needs at most one slot per running request: no need to count the decoding ones then.
        if available >= len(self.running) or available >= self._decode_need():
            return
        victims = sorted(self.running, key=retraction_order, reverse=True)
        while len(self.running) > 1 and self.cache.available() < self._decode_need() * _RETRACT_HEADROOM_STEPS:
            self.retract(victims.pop(), "KV pool full")
        self.estimate.retracted(self.running)

    def _decode_need(self) -> int:
        """KV slots the next step needs at least: one per decoding request, one for any progress."""
        return max(1, sum(1 for r in self.running if not r.prefilling))

    def retract(self, req: Request, why: str) -> None:
        """Send a running request back to the front of the waiting queue. It keeps its output tokens
        and resumes where it was; its computed KV goes to the prefix cache (or is freed)."""
        self.running.remove(req)
        req.replay_until = max(req.replay_until, req.kv_len)
        self.cache.release(req)
        req.retracted = True
        self.waiting.appendleft(req)
        self.num_retractions += 1
        logger.warning(
            "retracted request %s (%s): %d of %d tokens generated; %d retractions so far",
            req.rid,
            why,
            len(req.output_ids),
            req.sampling.max_new_tokens,
            self.num_retractions,
        )

    # ---- running a step ----

    def launch(self, step: Step) -> Optional[InFlight]:
        """Queue the step's forward pass and sampling on the device; returns without waiting for them."""
        prefilled, completed = [], []  # per entry: it was prefilling; its prefill is complete after this step
        for req, n in step.entries:
            was = req.prefilling
            req.kv_len += n  # the step's slots are in req_to_token now, whatever happens next
            prefilled.append(was)
            completed.append(was and not req.prefilling)
        # A step with constrained rows samples later, once their masks can be filled (sample()).
        constrained = step.sampling is not None and any(
            step.entries[i][0].grammar is not None for i in step.sample_entries
        )
        try:
            if step.pending_inputs:
                self.in_flight.fill_input_ids(step.batch, step.pending_inputs)
            output = self.runner.launch(step.batch, None if constrained else step.sampling, step.keep_hidden)
        except Exception as exc:  # one bad step fails its requests, not the engine
            self.fail_step(step, exc)
            return None
        # What the prefilling requests computed joins the prefix cache now, not when the step is
        # read: requests scheduled meanwhile (the n samples of a prompt, a shared system prompt) reuse
        # it. Steps run in order on the device, so a later step never reads these slots early.
        for (req, _), was_prefilling in zip(step.entries, prefilled):
            if was_prefilling:
                self.cache.cache_prefix(req)
        return InFlight(step, output, completed)

    def sample(self, launched: InFlight) -> bool:
        """Queue the sampling of a step launched without it (in_flight.py), if it was; False if that failed."""
        try:
            launched.sample(self.runner, self.masks)
        except Exception as exc:
            self.fail_step(launched.step, exc)
            return False
        return True

    def unbuild(self, step: Step) -> None:
        """Give back the slots a built step took, without launching it (the step in flight, whose tokens it
        may decode, failed): its requests that are still running continue from where they were."""
        self.pool.free_slots(step.batch.out_cache_loc)

    def process(self, launched: InFlight) -> None:
        """Wait for a launched step, then hand its tokens to its requests: finish checks, outputs."""
        self.sample(launched)  # without overlap, a constrained step is sampled only now
        step, output = launched.step, launched.output
        launched.tokens_read()
        mark = self.runner.profiler.mark
        try:
            tokens = self.runner.wait(output.sampled)
            mark("wait")
            next_ids = read_step_outputs(step, output.hidden, output.logits, tokens, self.pooler)
        except Exception as exc:
            self.fail_step(step, exc)
            return
        took: list[Request] = []
        for (req, _), token, completed in zip(step.entries, next_ids, launched.completed):
            if req.finish is not None:  # finished (or aborted) while this step ran: its token is dropped
                continue
            if token is None:
                if req.error is not None:
                    self.finish(req, FinishReason(type="abort", message=f"internal error: {req.error}"))
                elif completed and req.sampling.max_new_tokens == 0:
                    self.finish(req, FinishReason(type="length", matched=None))
                continue
            req.output_ids.append(token)
            req.new_ids.append(token)
            took.append(req)
        constrained = [(req, req.output_ids[-1]) for req in took if req.grammar is not None]
        if constrained:
            self.masks.accept(constrained)
            mark("accept")
        for req in took:
            reason = self.finish_checker.check(req)
            if reason is not None:
                self.finish(req, reason)
        mark("finish")
        if self.in_flight is not None:  # with overlap: its matchers are current now
            self.in_flight.fill_mask_ahead(self.masks)
            mark("fill_ahead")
        self.estimate.step_done()
        self.outputs += [req for req, _ in step.entries]
        self._drop_finished()

    def fail_step(self, step: Step, exc: Exception) -> None:
        logger.error("step failed: %s", traceback.format_exc())
        message = f"internal error: {type(exc).__name__}: {exc}"
        for req, _ in step.entries:
            if req.finish is None:  # this step's KV is not trusted: freed, not cached
                self.finish(req, FinishReason(type="abort", message=message), keep_kv=False)
        self._drop_finished()

    def finish(self, req: Request, reason: FinishReason, keep_kv: bool = True) -> None:
        """req is done: its KV goes to the prefix cache (keep_kv) or back to the pool, its row is freed.
        It leaves `running` at the next _drop_finished(), once no loop over `running` is under way."""
        req.finish = reason
        if req.row is not None:
            self.cache.release(req, keep=keep_kv)
        elif req.retracted and req in self.waiting:  # retracted while its last token was in flight
            self.waiting.remove(req)
        self.outputs.append(req)

    def abort(self, rids: set[str], message: str) -> None:
        for req in self.grammars.remove(rids):
            self.finish(req, FinishReason(type="abort", message=message))
        for req in [r for r in self.waiting if r.rid in rids]:
            self.waiting.remove(req)
            self.finish(req, FinishReason(type="abort", message=message))
        for req in self.running:
            if req.rid in rids and req.finish is None:
                self.finish(req, FinishReason(type="abort", message=message))
        self._drop_finished()

    def _drop_finished(self) -> None:
        if any(r.finish is not None for r in self.running):
            self.running = [r for r in self.running if r.finish is None]


def run_scheduler(args: EngineArgs, endpoints: Endpoints, context: zmq.Context) -> None:
    tp, workers = start_tensor_parallel(args, endpoints)  # rank 0 of tp_size processes
    try:
        Scheduler(args, endpoints, context, tp, workers).run_forever()
    except BaseException:
        if workers is not None:  # a dead worker is the error to report: give its watcher time to do so
            workers.wait_for_exit(timeout=1.0)
        raise
