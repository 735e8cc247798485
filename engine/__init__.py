"""ferry: a multi-process LLM inference engine. `from engine import Engine`.

Imports stay cheap: Engine (and with it transformers and zmq) loads on first use.
"""

from typing import Any

__all__ = ["Engine", "EngineError", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.engine import Engine

        return Engine
    if name == "EngineError":
        from engine.shared.errors import EngineError

        return EngineError
    if name == "SamplingParams":
        from engine.shared.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
