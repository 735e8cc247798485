"""The SGLang offline-engine page's four modes, on ferry's default model (CPU or GPU)."""

import asyncio

from engine import Engine
from engine.utils import async_stream_and_merge, stream_and_merge


def main() -> None:
    llm = Engine()
    prompts = [
        "Hello, my name is",
        "The president of the United States is",
        "The capital of France is",
        "The future of AI is",
    ]

    print("=== Non-streaming synchronous generation ===")
    for prompt, output in zip(
        prompts, llm.generate(prompts, {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 48})
    ):
        print(f"Prompt: {prompt}\nGenerated text: {output['text']}\n")

    print("=== Streaming synchronous generation ===")
    for prompt in prompts[2:]:
        print(f"Prompt: {prompt}")
        print(
            "Generated text:", stream_and_merge(llm, prompt, {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 48})
        )
        print()

    print("=== Non-streaming asynchronous generation ===")

    async def batch() -> None:
        outputs = await llm.async_generate(prompts, {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 48})
        for prompt, output in zip(prompts, outputs):
            print(f"Prompt: {prompt}\nGenerated text: {output['text']}\n")

    asyncio.run(batch())

    print("=== Streaming asynchronous generation ===")

    async def stream() -> None:
        for prompt in prompts[2:]:
            print(f"Prompt: {prompt}\nGenerated text: ", end="", flush=True)
            async for piece in async_stream_and_merge(
                llm, prompt, {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 48}
            ):
                print(piece, end="", flush=True)
            print("\n")

    asyncio.run(stream())

    print("=== Chat ===")
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], {"temperature": 0})
    print(reply["text"])
    llm.shutdown()


if __name__ == "__main__":
    main()
