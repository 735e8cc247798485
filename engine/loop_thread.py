"""The engine's own event loop, in a thread the engine owns: callers of any thread and any event loop
reach it through thread-safe futures, so no caller's loop, policy or signal handler is touched."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, AsyncIterator, Coroutine, Iterator, TypeVar

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread until coro is done on the engine loop. Ctrl-C (or any exception
        while waiting) cancels it there, which aborts its requests, and then propagates."""
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

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
        except RuntimeError:  # the loop is closed: the engine is shut down and its requests are gone
            coro.close()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
            self.loop.close()


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _aclose(agen: Any) -> None:
    await agen.aclose()
