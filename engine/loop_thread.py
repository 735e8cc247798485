"""The engine's own event loop, in a thread the engine owns: callers of any thread and any event loop
reach it through thread-safe futures, so no caller's loop, policy or signal handler is touched."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from engine.shared.errors import EngineError

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop (uvloop where available) running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self.loop = _new_loop()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule coro on the engine loop; raises EngineError once the loop is stopped."""
        if self.loop.is_closed() or self._stopped:
            coro.close()
            raise EngineError("the engine is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread until coro is done on the engine loop. Ctrl-C (or any exception
        while waiting) cancels it there, which aborts its requests, and then propagates."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking on the engine loop from its own thread would deadlock")
        future = self.submit(coro)
        try:
            while not self._wait(future, timeout=1.0):
                # Work submitted just as the engine shut down never runs: answer, don't hang.
                if not self._thread.is_alive():
                    raise EngineError("the engine is shut down")
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @staticmethod
    def _wait(future: concurrent.futures.Future[T], timeout: float) -> bool:
        """Whether future is done, waiting up to timeout (interruptible by Ctrl-C)."""
        try:
            future.exception(timeout)  # returns (never raises) the coroutine's own exception
        except concurrent.futures.TimeoutError:
            return False
        return True

    async def run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await coro from any other event loop; cancelling the awaiting task cancels coro too."""
        return await asyncio.wrap_future(self.submit(coro))

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """A blocking iterator over an async iterator that runs on the engine loop."""
        try:
            while True:
                try:
                    yield self.run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self.close_later(agen)  # stopping early (break, close, GC) aborts the requests

    async def iterate_async(self, agen: AsyncIterator[T]) -> AsyncIterator[T]:
        """The same as an async iterator for a caller on another event loop."""
        try:
            while True:
                try:
                    yield await self.run_async(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            self.close_later(agen)

    def close_later(self, agen: Any) -> None:
        """Close agen on the engine loop without waiting (we may be inside a finaliser)."""
        coro = _aclose(agen)
        try:
            self.submit(coro)
        except RuntimeError:  # EngineError or a closed loop: the engine is shut down, its requests gone
            coro.close()

    def stop(self) -> None:
        """Let the loop's tasks end (each blocked caller gets its answer, not a hang), then stop the
        loop and join its thread. Call it from another thread; calling it twice is harmless."""
        if self._stopped or threading.current_thread() is self._thread:
            return
        try:
            self.run(_finish_tasks(timeout=2.0))
        finally:
            self._stopped = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


async def _finish_tasks(timeout: float) -> None:
    """Wait for the loop's other tasks to end, cancelling those still running after timeout; then let
    their done-callbacks run, which hand each result or exception to the thread waiting for it."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.sleep(0)


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _aclose(agen: Any) -> None:
    await agen.aclose()
