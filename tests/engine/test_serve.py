"""The HTTP server, live on loopback: `python -m engine.serve` in a subprocess with the default model,
talked to by the official openai client and plain httpx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from engine import Engine

API_KEY = "sk-ferry-test"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 600  # model load on a busy 2-core machine
SETTLE_TIMEOUT_S = 60  # for state changes the test waits on (never a measured duration)


# ---- a live server ----


class LiveServer:
    """`python -m engine.serve` on a free loopback port; stderr goes to a log file shown on failure."""

    def __init__(self, log_path: str, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "engine.serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.children: list[int] = []
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode} while starting:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    self.children = _child_pids(self.proc.pid)
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"server not healthy after {START_TIMEOUT_S}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SETTLE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:  # never leave an engine behind, whatever the test did
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


def _wait_for(condition: Callable[[], Any], what: str, timeout: float = SETTLE_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _sse(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("serve") / "server.log"), "--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_name(http):
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference():
    """What Engine.generate / Engine.chat give in-process for the test prompts (greedy)."""
    with Engine(max_total_tokens=2048) as engine:
        return {"generate": engine.generate(PROMPTS, GREEDY), "chat": engine.chat(CHAT, GREEDY)}


def _info(http: httpx.Client) -> dict[str, Any]:
    return http.get("/get_server_info").json()


def _pool_is_free(info: dict[str, Any]) -> bool:
    """No request holds KV: what the prefix cache keeps is evictable, so it counts as free."""
    return (
        info["num_running"] == 0
        and info["num_waiting"] == 0
        and info["kv_free_tokens"] + info.get("kv_cached_tokens", 0) == info["kv_pool_tokens"]
    )


# ---- same answers as the engine ----


def test_generate_answers_what_engine_generate_does(http, reference):
    whole = http.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY}).json()
    single = http.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY}).json()
    for got, want in zip(whole, reference["generate"]):
        assert got["output_ids"] == want["output_ids"]
        assert got["text"] == want["text"]
        assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
        assert got["meta_info"]["completion_tokens"] == 12
    assert single["output_ids"] == reference["generate"][0]["output_ids"]


def test_generate_stream_is_the_whole_answer_in_pieces(http, reference):
    body = {
        "text": PROMPTS[1],
        "sampling_params": GREEDY,
        "stream": True,
        "return_logprob": True,
        "top_logprobs_num": 2,
    }
    with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["text"] for c in chunks) == reference["generate"][1]["text"]
    assert sum((c["output_ids"] for c in chunks), []) == reference["generate"][1]["output_ids"]
    assert [c["meta_info"]["finish_reason"] for c in chunks][-1] == {"type": "length", "matched": None}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    logprobs = sum((c["meta_info"]["output_token_logprobs"] for c in chunks), [])
    assert [token for _, token, _ in logprobs] == reference["generate"][1]["output_ids"]
    assert all(len(top) == 2 for c in chunks for top in c["meta_info"]["output_top_logprobs"])


def test_generate_hidden_states_are_json_lists(http):
    out = http.post(
        "/generate",
        json={"text": PROMPTS[0], "return_hidden_states": True, "sampling_params": {**GREEDY, "max_new_tokens": 3}},
    ).json()
    hidden = out["meta_info"]["hidden_states"]
    info = _info(http)
    prompt_states = hidden[0]
    assert len(prompt_states) == out["meta_info"]["prompt_tokens"]
    assert all(len(row) == info["hidden_size"] for row in prompt_states)
    assert len(hidden) == 1 + 2 and all(len(step) == info["hidden_size"] for step in hidden[1:])


def test_openai_completions_match_the_engine(client, model_name, reference):
    want = reference["generate"][0]
    extra = {"ignore_eos": True}
    whole = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body=extra
    )
    assert whole.choices[0].text == want["text"]
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (want["meta_info"]["prompt_tokens"], 12)
    stream = client.completions.create(
        model=model_name,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_completions_batch_logprobs_and_echo(client, model_name, reference):
    out = client.completions.create(
        model=model_name, prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice, want in zip(out.choices, reference["generate"]):
        assert choice.text == want["text"]
        assert "".join(choice.logprobs.tokens) == want["text"]
        assert choice.logprobs.text_offset == [sum(map(len, choice.logprobs.tokens[:k])) for k in range(12)]
        assert len(choice.logprobs.token_logprobs) == 12 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert all(
            len(top) <= 3 and max(top.values()) >= lp - 1e-5
            for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs)
        )
    assert out.usage.completion_tokens == 36
    echoed = client.completions.create(
        model=model_name, prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True, extra_body={"ignore_eos": True}
    )
    assert echoed.choices[0].text == PROMPTS[0] + reference["generate"][0]["text"]


def test_openai_chat_matches_engine_chat(client, model_name, reference):
    want = reference["chat"]
    extra = {"ignore_eos": True}
    whole = client.chat.completions.create(
        model=model_name, messages=CHAT, max_tokens=12, temperature=0, extra_body=extra
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want["text"]
    assert whole.usage.prompt_tokens == want["meta_info"]["prompt_tokens"]
    stream = client.chat.completions.create(
        model=model_name,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        logprobs=True,
        top_logprobs=2,
        extra_body=extra,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "length"
    token_logprobs = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(token_logprobs) == 12 and all(len(t.top_logprobs) == 2 for t in token_logprobs)


def test_openai_n_seed_and_stop(client, model_name, reference):
    sampled = dict(model=model_name, prompt=PROMPTS[2], max_tokens=6, temperature=1.5, n=3, seed=7)
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert len({c.text for c in first.choices}) > 1  # the n samples differ
    assert first.usage.prompt_tokens == reference["generate"][2]["meta_info"]["prompt_tokens"]  # counted once
    text = reference["generate"][0]["text"]
    stop = text.strip().split()[1]
    cut = client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_httpx_openai_endpoints_agree_with_generate(http, model_name, reference):
    body = {"model": model_name, "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == reference["generate"][1]["text"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = _sse(response)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == reference["generate"][1]["text"]


# ---- many clients, dropped clients ----


def test_64_concurrent_streams_all_complete(server, model_name, http):
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    expected = [out["text"] for out in http.post("/generate", json={"text": PROMPTS, "sampling_params": params}).json()]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one_generate(client: httpx.AsyncClient, i: int) -> tuple[int, str, int, bool]:
        body = {"text": PROMPTS[i % 3], "sampling_params": params, "stream": True}
        text, tokens, finish, saw_done = "", 0, None, False
        async with client.stream("POST", "/generate", json=body) as response:
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    saw_done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    text += chunk["text"]
                    tokens, finish = chunk["meta_info"]["completion_tokens"], chunk["meta_info"]["finish_reason"]
        return i, text, tokens, saw_done and finish == {"type": "length", "matched": None}

    async def one_openai(oai: openai.AsyncOpenAI, i: int) -> tuple[int, str, int, bool]:
        stream = await oai.completions.create(
            model=model_name,
            prompt=PROMPTS[i % 3],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finished = [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        return i, text, chunks[-1].usage.completion_tokens, finished

    async def run() -> list[tuple[int, str, int, bool]]:
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600, limits=limits) as client:
            oai = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=600)
            jobs = [one_generate(client, i) if i % 2 else one_openai(oai, i) for i in range(64)]
            results = await asyncio.gather(*jobs)
            await oai.close()
            return results

    results = asyncio.run(run())
    assert len(results) == 64
    for i, text, tokens, finished in results:
        assert (text, tokens, finished) == (expected[i % 3], 8, True), i
    assert _wait_for(lambda: _pool_is_free(_info(http)), "the pool to be free after 64 streams")


def _long_request(body_extra: dict[str, Any]) -> dict[str, Any]:
    # Far longer than the test waits: only an abort frees its slots in time.
    return {
        "text": PROMPTS[0],
        "sampling_params": {"temperature": 0, "max_new_tokens": 4000, "ignore_eos": True},
        **body_extra,
    }


def test_dropped_stream_is_aborted_and_frees_its_kv(server, http):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as own:
        with own.stream("POST", "/generate", json=_long_request({"stream": True})) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            assert all(next(events) != "data: [DONE]" for _ in range(3))
            info = _info(http)
            assert info["num_running"] == 1 and info["kv_free_tokens"] < info["kv_pool_tokens"]
    # The client is gone: the request must be aborted, not run its 4000 tokens.
    assert _wait_for(lambda: _pool_is_free(_info(http)), "the dropped stream's KV to be freed")
    flushed = http.post("/flush_cache").json()
    assert flushed["ok"], flushed
    info = _info(http)
    assert info["kv_free_tokens"] == info["kv_pool_tokens"]


def test_dropped_non_stream_request_is_aborted(server, http):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}) as own:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            own.post("/generate", json=_long_request({}), timeout=httpx.Timeout(300, read=5))
    assert _wait_for(lambda: _pool_is_free(_info(http)), "the abandoned request's KV to be freed")


# ---- errors, auth, service endpoints ----


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/generate", b"{not json", "body"),
        ("/generate", b"[1, 2]", "body"),
        ("/generate", {"text": "hi", "temprature": 0}, "temprature"),
        ("/generate", {"text": "hi", "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
        ("/generate", {"text": "hi", "sampling_params": {"top_p": 1.5}}, "sampling_params.top_p"),
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 10**6}}, "sampling_params.max_new_tokens"),
        ("/generate", {"text": 5}, "text"),
        ("/generate", {"input_ids": [1, 10**9]}, "input_ids"),
        ("/generate", {}, "text"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": 3}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "tools": []}, "tools"),
        ("/v1/completions", {"max_tokens": 4}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 99}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
        ),
    ],
)
def test_bad_requests_get_400_naming_the_field(http, model_name, path, body, param):
    if isinstance(body, dict):
        if path.startswith("/v1/"):
            body = {"model": model_name, **body}
        response = http.post(path, json=body)
    else:
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["message"]
    good = http.post("/generate", json={"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 2}})
    assert good.status_code == 200 and good.json()["meta_info"]["completion_tokens"] == 2


def test_any_model_name_or_none_is_the_served_model(client, http, model_name, server):
    """As SGLang: one model behind the server, so curl examples naming another (or none) still work."""
    out = client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert out.model == model_name and out.usage.completion_tokens == 2
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        answer = http.post(path, json={**body, "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model_name
    assert "uvicorn.error" not in server.logs()  # uvicorn's lines carry the server's logger name


def test_a_taken_port_fails_at_once_before_loading_the_model(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "engine.serve", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "in use" in done.stderr, done.stderr
    assert "starting the engine" not in done.stderr
    assert time.monotonic() - start < 60  # no model was loaded


def test_help_shows_the_server_defaults():
    text = subprocess.run(
        [sys.executable, "-m", "engine.serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    options = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n(?=  --)", text)[1:]}
    assert "(default: 30000)" in options["--port"]
    assert "--no-access-log one log line per HTTP request (default: True)" in options["--access-log,"]


def test_api_key_is_required_except_on_health(server, model_name):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", "/get_server_info"),
            ("GET", "/metrics"),
            ("POST", "/generate"),
            ("POST", "/flush_cache"),
        ):
            response = httpx.request(method, server.url + path, headers=headers, json={"text": "hi"}, timeout=60)
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model_name, prompt="hi", max_tokens=2)


def test_models_and_server_info(http, model_name):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "SmolLM2-135M-Instruct"
    info = _info(http)
    assert info["kv_pool_tokens"] > 0 and info["vocab_size"] == 49152
    assert info["context_length"] == models["data"][0]["max_model_len"]


def test_flush_cache(http):
    response = http.post("/flush_cache")
    if not hasattr(Engine, "flush_cache"):
        assert response.status_code == 501
        return
    assert response.status_code == 200 and response.json()["ok"] is True


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_count_tokens_and_time_first_tokens(http, model_name):
    before = http.get("/metrics").text
    http.post("/generate", json={"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 5}})
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": model_name, "prompt": PROMPTS[1], "max_tokens": 7, "ignore_eos": True, "stream": True},
    ) as response:
        assert _sse(response)[-1] == "[DONE]"
    after = http.get("/metrics").text
    assert _metric(after, "ferry_generation_tokens_total") - _metric(before, "ferry_generation_tokens_total") == 12
    count = "ferry_time_to_first_token_seconds_count"
    assert _metric(after, count) - _metric(before, count) == 2  # a non-stream and a stream request
    assert _metric(after, 'ferry_time_to_first_token_seconds_bucket{le="+Inf"}') == _metric(after, count)
    assert _metric(after, "ferry_generation_tokens_per_second") >= 0
    assert _metric(after, "ferry_engine_up") == 1
    assert _metric(after, "ferry_num_requests_running") == 0 and _metric(after, "ferry_num_requests_waiting") == 0
    assert _metric(after, "ferry_kv_pool_tokens") == _info(http)["kv_pool_tokens"]


# ---- command line ----


def test_every_engine_setting_is_a_flag():
    from engine.serve import parse_args
    from engine.shared.args import EngineArgs, field_names

    settings, engine_settings = parse_args(
        [
            "--port",
            "31000",
            "--context-length",
            "4096",
            "--disable-cuda-graph",
            "--mem-fraction-static",
            "0.5",
            "--dtype",
            "float32",
        ]
    )
    assert (settings.host, settings.port, settings.api_key) == ("127.0.0.1", 31000, None)
    assert engine_settings == {
        "context_length": 4096,
        "disable_cuda_graph": True,
        "mem_fraction_static": 0.5,
        "dtype": "float32",
    }
    assert parse_args([])[1] == {}  # flags not given keep EngineArgs' defaults
    for name in field_names():
        default = getattr(EngineArgs(), name)
        value = [] if isinstance(default, bool) else [str(default if default is not None else 1)]
        if name in ("model_path", "tokenizer_path", "cache_dir"):
            value = ["/some/path"]
        checked = {
            "quantization": ["fp8"],
            "dist_init_addr": ["127.0.0.1:29500"],
            "decode_attention_backend": ["triton"],
        }
        value = checked.get(name, value)  # values the settings check
        assert name in parse_args(["--" + name.replace("_", "-"), *value])[1], name
    with pytest.raises(SystemExit):  # EngineArgs' own validation, at the command line
        parse_args(["--dtype", "float64"])


# ---- service lifecycle: SIGTERM, engine failure ----


def test_sigterm_lets_running_requests_finish_then_exits_0(tmp_path):
    srv = LiveServer(str(tmp_path / "server.log"), "--graceful-timeout", "120")
    try:
        params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
        results: dict[str, Any] = {}
        started = threading.Semaphore(0)

        def stream(name: str) -> None:
            with httpx.stream(
                "POST",
                f"{srv.url}/generate",
                timeout=300,
                json={"text": PROMPTS[0], "sampling_params": params, "stream": True},
            ) as response:
                events = []
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        if len(events) == 1:
                            started.release()
                results[name] = events

        def whole() -> None:
            results["whole"] = httpx.post(
                f"{srv.url}/generate", timeout=300, json={"text": PROMPTS[1], "sampling_params": params}
            ).json()

        threads = [threading.Thread(target=stream, args=(f"s{i}",)) for i in range(3)] + [
            threading.Thread(target=whole)
        ]
        for t in threads:
            t.start()
        for _ in range(3):
            assert started.acquire(timeout=START_TIMEOUT_S)
        assert _wait_for(
            lambda: httpx.get(f"{srv.url}/get_server_info", timeout=60).json()["num_running"] == 4, "4 running"
        )
        srv.proc.send_signal(signal.SIGTERM)
        # No new connections while the running requests finish.
        _wait_for(lambda: not _accepts_connections(srv.port), "the listening socket to close")
        for t in threads:
            t.join(300)
        assert srv.proc.wait(120 + SETTLE_TIMEOUT_S) == 0, srv.logs()
        for i in range(3):
            events = results[f"s{i}"]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["meta_info"]["completion_tokens"] == 24
        assert results["whole"]["meta_info"]["completion_tokens"] == 24
        assert srv.children and not [pid for pid in srv.children if _alive(pid)]
        assert "SIGTERM" in srv.logs()
    finally:
        srv.stop()


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_engine_death_exits_nonzero_with_no_child_left(tmp_path):
    srv = LiveServer(str(tmp_path / "server.log"))
    try:
        scheduler = [pid for pid in srv.children if b"scheduler_proc" in _cmdline(pid)]
        assert len(scheduler) == 1 and len(srv.children) == 2
        os.kill(scheduler[0], signal.SIGKILL)
        code = srv.proc.wait(120)
        assert code != 0, srv.logs()
        assert not [pid for pid in srv.children if _alive(pid)]
        assert "the engine failed" in srv.logs()
    finally:
        srv.stop()


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
