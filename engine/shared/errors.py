"""The one exception type the engine raises for its own failures (user mistakes raise ValueError/TypeError)."""


class EngineError(RuntimeError):
    """A child process failed or the engine was shut down; the message carries the child's traceback."""
