"""ferry's HTTP server: FastAPI app around one Engine. Start it with `python -m engine.serve` (engine/serve.py).

- service.py: the Engine behind the server (start, probe, watchdog, stop) and the server's settings
- app.py: the FastAPI app, its lifespan and the native endpoints (/generate, /health, /metrics, ...)
- openai_api.py, openai_protocol.py: /v1/completions, /v1/chat/completions, /v1/models
- middleware.py: request ids, API key, access log; errors.py: OpenAI-style error bodies
- streaming.py: JSON and server-sent events; metrics.py: Prometheus text
"""
