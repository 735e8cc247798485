"""Your own HTTP server around ferry's Engine, in a few lines (the SGLang offline-engine docs' custom_server).

    python scripts/custom_server.py            # then:
    curl -s localhost:8000/generate -d '{"prompt": "The capital of France is"}'
    curl -sN localhost:8000/stream -d '{"prompt": "Once upon a time,"}'

The Engine is safe in any thread and event loop: await `async_generate` from your handlers. For a full
OpenAI-compatible service (auth, metrics, graceful shutdown) run `python -m engine.serve` instead.
"""

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from engine import Engine

SAMPLING = {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 128}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine = Engine()  # loads the model: the server accepts requests once it is ready
    yield
    app.state.engine.shutdown()


app = FastAPI(lifespan=lifespan)


async def _prompt(request: Request) -> str:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise HTTPException(400, 'send {"prompt": "..."}')
    return body["prompt"]


@app.post("/generate")
async def generate(request: Request) -> dict[str, Any]:
    try:
        output = await request.app.state.engine.async_generate(await _prompt(request), SAMPLING)
    except ValueError as error:  # the engine names the bad field
        raise HTTPException(400, str(error)) from error
    return {"text": output["text"], "tokens": output["meta_info"]["completion_tokens"]}


@app.post("/stream")
async def stream(request: Request) -> StreamingResponse:
    chunks = await request.app.state.engine.async_generate(await _prompt(request), SAMPLING, stream=True)

    async def text() -> AsyncIterator[str]:
        # A client that goes away closes this generator and with it the engine's stream: the request is aborted.
        async for chunk in chunks:
            yield chunk["text"]

    return StreamingResponse(text(), media_type="text/plain")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000, loop="uvloop")
