"""Issue 20: embedding models. `Engine(path, is_embedding=True).encode(...)` on a tiny Qwen3 embedding folder
laid out as Qwen3-Embedding's (the bare decoder's weights, no LM head, a sentence-transformers modules.json
asking for last-token pooling and normalisation) gives HF's last-token hidden state, L2-normalised; prompts
are prefilled in chunks through the same scheduler and keep no KV; /v1/embeddings answers OpenAI's client."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil

import numpy as np
import pytest
import torch
from reference import assert_pool_free

from engine import Engine

TEXTS = ["The capital of France is Paris.", "def fibonacci(n):", "Hello"]
LONG_IDS = [(31 * i + 7) % 20000 for i in range(100)]  # longer than a prefill chunk


def embedding_model_dir(tmp_path, tokenizer_dir: str) -> str:
    """A random Qwen3 decoder saved as an embedding model is: bare decoder names, no lm_head, ST configs."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(
        "qwen3",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    out = tmp_path / "qwen3-embedding"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(saved | {"architectures": ["Qwen3ForCausalLM"]}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            shutil.copy(os.path.join(tokenizer_dir, name), out / name)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": 64, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return str(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, default_model_path) -> str:
    return embedding_model_dir(tmp_path_factory.mktemp("embedding"), default_model_path)


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_dir, is_embedding=True, chunked_prefill_size=32, max_total_tokens=1024) as e:
        yield e


def _hf_embeddings(model_dir: str, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        last = [hf(torch.tensor([ids])).last_hidden_state[0, -1] for ids in prompts]
    return [torch.nn.functional.normalize(v, dim=0) for v in last]


def test_encode_equals_hfs_normalised_last_token(engine, model_dir):
    outputs = engine.encode(TEXTS) + [engine.encode(input_ids=LONG_IDS)]
    prompts = [engine.tokenizer(t)["input_ids"] for t in TEXTS] + [LONG_IDS]
    for out, expected, ids in zip(outputs, _hf_embeddings(model_dir, prompts), prompts):
        ours = torch.tensor(out["embedding"])
        assert ours.shape == (64,) and abs(ours.norm().item() - 1.0) < 1e-5
        assert torch.nn.functional.cosine_similarity(ours, expected, dim=0) > 0.9999
        assert out["meta_info"]["prompt_tokens"] == len(ids)
        assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert isinstance(engine.encode("one prompt"), dict)  # one prompt: one dict, as SGLang


def test_embedding_requests_keep_no_kv(engine):
    engine.encode([TEXTS[0]] * 3 + ["another"])
    info = assert_pool_free(engine)
    assert info["kv_cached_tokens"] == 0 and info["kv_free_tokens"] == info["kv_pool_tokens"]


def test_generate_on_an_embedding_engine_is_an_error(engine):
    with pytest.raises(ValueError, match="encode"):
        engine.generate("Hello", {"max_new_tokens": 4})
    with pytest.raises(ValueError, match="encode"):
        engine.chat([{"role": "user", "content": "Hi"}])


def test_v1_embeddings_answers_the_openai_client(engine):
    import httpx
    import openai

    from engine.server.app import build_app
    from engine.server.service import ServerSettings, Service

    service = Service(ServerSettings(), {})
    service.engine, service.model_name = engine, "tiny-embedding"  # the running engine; no lifespan here
    app = build_app(service)

    async def call() -> tuple:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ferry") as http:
            client = openai.AsyncOpenAI(base_url="http://ferry/v1", api_key="none", http_client=http)
            answer = await client.embeddings.create(input=TEXTS, model="anything")  # base64 on the wire
            floats = await http.post("/v1/embeddings", json={"input": [1, 2, 3], "encoding_format": "float"})
            bad = await http.post("/v1/embeddings", json={"input": "x", "dimensions": 8})
        return answer, floats, bad

    answer, floats, bad = asyncio.run(call())
    expected = engine.encode(TEXTS)
    assert answer.model == "tiny-embedding" and [d.index for d in answer.data] == [0, 1, 2]
    for item, out in zip(answer.data, expected):
        np.testing.assert_allclose(item.embedding, out["embedding"], rtol=1e-6, atol=1e-6)
    assert answer.usage.prompt_tokens == sum(o["meta_info"]["prompt_tokens"] for o in expected)
    body = floats.json()
    assert floats.status_code == 200 and len(body["data"][0]["embedding"]) == 64
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "dimensions"
    raw = base64.b64encode(np.asarray(expected[0]["embedding"], dtype="<f4").tobytes()).decode()
    assert np.allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), answer.data[0].embedding)
