"""The OpenAI-compatible SIMULATOR over real HTTP: raw httpx wire checks and the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from voxcore.simulator import (
    EchoReply,
    Fault,
    OpenAISimulator,
    RequestPlan,
    ScriptedReplies,
    schema_example,
)

KEY = "sk-simulator"
AUTH = {"Authorization": f"Bearer {KEY}"}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "is_safe": {"type": "boolean"},
        "aggression_score": {"type": "integer"},
        "internal_thought": {"type": ["string", "null"]},
        "answer": {"type": "string"},
    },
    "required": ["is_safe", "aggression_score", "internal_thought", "answer"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "voice_answer", "strict": True, "schema": SCHEMA},
}


@pytest.fixture
async def sim() -> AsyncIterator[OpenAISimulator]:
    async with OpenAISimulator(chars_per_chunk=5) as simulator:
        yield simulator


@pytest.fixture
async def client(sim: OpenAISimulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH, timeout=5.0) as http:
        yield http


def chat_body(text: str = "привет", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order (raises what the transport raises)."""
    events: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
        else:
            assert line == "", line
    return events


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, list[str]]:
    async with client.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return response, await sse_events(response)


def contents(events: list[str]) -> list[str]:
    out: list[str] = []
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        for choice in chunk["choices"]:
            if choice["delta"].get("content"):
                out.append(choice["delta"]["content"])
    return out


# ------------------------------------------------------------------------------------------ basics


async def test_models_list_and_retrieve(client: httpx.AsyncClient) -> None:
    r = await client.get("/models")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["gpt-4o-mini", "gpt-4o", "sim-small"]
    assert all(m["object"] == "model" and m["owned_by"] == "voxcore-simulator" for m in body["data"])
    assert all(isinstance(m["created"], int) for m in body["data"])

    one = await client.get("/models/gpt-4o")
    assert one.status_code == 200 and one.json()["id"] == "gpt-4o"
    missing = await client.get("/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_auth_failure_missing_and_wrong_key(sim: OpenAISimulator) -> None:
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong-key-123456"}):
            r = await http.get("/models", headers=headers)
            assert r.status_code == 401
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert error["code"] == "invalid_api_key"


async def test_no_auth_when_api_key_is_none() -> None:
    async with (
        OpenAISimulator(api_key=None) as sim,
        httpx.AsyncClient(base_url=sim.base_url) as http,
    ):
        assert (await http.get("/models")).status_code == 200


async def test_unknown_path_bad_json_and_unknown_model(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    r = await client.get("/nothing/here")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request_error"

    bad = await client.post(
        "/chat/completions", content=b'{"model": "gpt-4o-mini", "messages": [', headers={}
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"

    missing = await client.post("/chat/completions", json={"model": "gpt-4o-mini"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"

    unknown = await client.post("/chat/completions", json={**chat_body(), "model": "gpt-9"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert sim.requests_by_path["/v1/chat/completions"] == 3
    assert sim.requests_by_path["/v1/nothing/here"] == 1


async def test_non_streaming_chat_completion(client: httpx.AsyncClient, sim: OpenAISimulator) -> None:
    r = await client.post("/chat/completions", json=chat_body("как дела?"))
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content)
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "Вы сказали: как дела?"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6  # ceil(21 / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert sim.last_request_json == chat_body("как дела?")
    assert sim.last_request_headers["authorization"] == f"Bearer {KEY}"


async def test_streaming_chat_with_done_and_usage(client: httpx.AsyncClient) -> None:
    response, events = await stream_chat(client, chat_body(stream_options={"include_usage": True}))
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(contents(events)) == "Вы сказали: привет"
    assert all(len(piece) <= 5 for piece in contents(events))
    finish = chunks[-2]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5  # ceil(18 / 4)
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_streaming_without_include_usage_has_no_usage_chunk(client: httpx.AsyncClient) -> None:
    _, events = await stream_chat(client, chat_body())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c and c["choices"] for c in chunks)


async def test_max_tokens_cuts_with_finish_reason_length(client: httpx.AsyncClient) -> None:
    r = await client.post("/chat/completions", json=chat_body("очень длинное сообщение", max_tokens=2))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "Вы сказали: очень длинное сообщение"[:8]


# ------------------------------------------------------------------------------------------ replies


async def test_structured_json_schema_streaming_in_schema_order(client: httpx.AsyncClient) -> None:
    text = 'он сказал "стоп"\nи ушёл \\ 🙂'
    _, events = await stream_chat(client, chat_body(text, response_format=RESPONSE_FORMAT))
    pieces = contents(events)
    assert len(pieces) > 5 and all(len(p) <= 5 for p in pieces)
    content = "".join(pieces)
    parsed = json.loads(content)
    assert list(parsed) == ["is_safe", "aggression_score", "internal_thought", "answer"]
    assert parsed == {
        "is_safe": True,
        "aggression_score": 0,
        "internal_thought": None,
        "answer": "Вы сказали: " + " ".join(text.split()),
    }
    # The text is cut at arbitrary character positions: some delta boundary falls inside a JSON string
    # escape or right after a multi-byte character, and at least one delta is not valid JSON on its own.
    boundaries = {sum(len(p) for p in pieces[: i + 1]) for i in range(len(pieces) - 1)}
    escapes = {i + 1 for i, ch in enumerate(content) if ch == "\\"}
    assert boundaries & escapes or any(ord(content[b - 1]) > 127 for b in boundaries)


async def test_scripted_replies_dict_and_text_then_echo(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    scripted = {"answer": "сначала ответ", "is_safe": False, "aggression_score": 7}
    policy = sim.script(scripted, "второй")
    r1 = await client.post("/chat/completions", json=chat_body(response_format=RESPONSE_FORMAT))
    content = r1.json()["choices"][0]["message"]["content"]
    assert content == json.dumps(scripted, ensure_ascii=False, separators=(",", ":"))
    assert list(json.loads(content)) == ["answer", "is_safe", "aggression_score"]
    _, events = await stream_chat(client, chat_body())
    assert "".join(contents(events)) == "второй"
    assert policy.remaining == 0
    r3 = await client.post("/chat/completions", json=chat_body("эхо"))
    assert r3.json()["choices"][0]["message"]["content"] == "Вы сказали: эхо"


async def test_callable_reply_policy_and_json_object() -> None:
    seen: list[dict[str, Any]] = []

    async def policy(request: dict[str, Any]) -> str:
        seen.append(request)
        return f"модель {request['model']}"

    async with (
        OpenAISimulator(reply=policy) as sim,
        httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as http,
    ):
        body = chat_body(response_format={"type": "json_object"}, model="sim-small")
        r = await http.post("/chat/completions", json=body)
        assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"answer": "модель sim-small"}
        assert seen == [body]


def test_schema_example_and_echo_helpers() -> None:
    nested = {
        "$defs": {"Mood": {"type": "string", "enum": ["calm", "angry"]}},
        "type": "object",
        "properties": {
            "mood": {"$ref": "#/$defs/Mood"},
            "score": {"type": "number", "minimum": 3},
            "tags": {"type": "array", "items": {"type": "string"}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "text": {"type": "string"},
        },
    }
    assert schema_example(nested, answer="hi") == {
        "mood": "calm",
        "score": 3,
        "tags": [],
        "note": None,
        "text": "hi",
    }
    assert schema_example(SCHEMA, answer="a", overrides={"is_safe": False})["is_safe"] is False
    long_text = "слово " * 100
    echoed = EchoReply(max_chars=40)({"messages": [{"role": "user", "content": long_text}]})
    assert echoed.startswith("Вы сказали: слово") and echoed.endswith("…") and len(echoed) <= 12 + 41
    assert ScriptedReplies([])({"messages": []}) == "Вы ничего не сказали."


# ------------------------------------------------------------------------------------------ faults


async def test_rate_limit_has_retry_after_and_ratelimit_headers(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    sim.inject(Fault.RATE_LIMIT, retry_after=2, times=2)
    assert (await client.get("/models")).status_code == 200  # a models ping does not eat chat faults
    for _ in range(2):
        r = await client.post("/chat/completions", json=chat_body())
        assert r.status_code == 429
        assert r.headers["retry-after"] == "2"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-ratelimit-reset-requests" in r.headers
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await client.post("/chat/completions", json=chat_body())).status_code == 200


@pytest.mark.parametrize(
    ("fault", "status", "code", "type_"),
    [
        (Fault.BAD_KEY, 401, "invalid_api_key", "invalid_request_error"),
        (Fault.UNKNOWN_MODEL, 404, "model_not_found", "invalid_request_error"),
        (Fault.SERVER_ERROR, 500, None, "server_error"),
        (Fault.SERVICE_UNAVAILABLE, 503, None, "server_error"),
    ],
)
async def test_status_faults(
    client: httpx.AsyncClient, sim: OpenAISimulator, fault: Fault, status: int, code: str | None, type_: str
) -> None:
    sim.inject(fault)
    r = await client.post("/chat/completions", json=chat_body(stream=True))
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["type"] == type_
    assert sim.pending_plans == 0


async def test_default_fault_mode_applies_until_cleared(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    sim.set_default_fault(Fault.SERVICE_UNAVAILABLE, retry_after=1)
    for _ in range(3):
        r = await client.post("/chat/completions", json=chat_body())
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    sim.set_default_fault(None)
    assert (await client.post("/chat/completions", json=chat_body())).status_code == 200


async def test_timeout_fault_makes_client_read_timeout(sim: OpenAISimulator) -> None:
    sim.inject(Fault.TIMEOUT)
    timeout = httpx.Timeout(5.0, read=0.3)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH, timeout=timeout) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", json=chat_body())
        assert (await http.post("/chat/completions", json=chat_body())).status_code == 200


async def test_stall_fault_sends_headers_then_stalls(sim: OpenAISimulator) -> None:
    sim.inject(Fault.STALL, after_chunks=1)
    timeout = httpx.Timeout(5.0, read=0.3)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH, timeout=timeout) as http:
        events: list[str] = []
        async with http.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                async for line in response.aiter_lines():
                    if line:
                        events.append(line)
        assert len(events) == 2  # role chunk + one content chunk


async def test_stop_closes_stalled_connections_promptly() -> None:
    sim = OpenAISimulator()
    await sim.start()
    sim.inject(Fault.TIMEOUT)
    async with httpx.AsyncClient(base_url=sim.base_url, headers=AUTH, timeout=10.0) as http:
        pending = asyncio.ensure_future(http.post("/chat/completions", json=chat_body()))
        async with asyncio.timeout(5):
            await sim.wait_for_requests(1, path="/v1/chat/completions")
        assert sim.open_connections == 1
        started = time.monotonic()
        await sim.stop()
        assert time.monotonic() - started < 1.0
        assert sim.open_connections == 0
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await pending


async def test_malformed_sse_line_is_not_json(client: httpx.AsyncClient, sim: OpenAISimulator) -> None:
    sim.inject(Fault.MALFORMED)
    _, events = await stream_chat(client, chat_body())
    bad = [e for e in events if e != "[DONE]" and not _is_json(e)]
    assert bad == ['{"choices": [']
    assert events[-1] == "[DONE]"


async def test_truncated_stream_ends_without_done(client: httpx.AsyncClient, sim: OpenAISimulator) -> None:
    sim.inject(Fault.TRUNCATED, after_chunks=3)
    events: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with client.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
    assert "[DONE]" not in events
    assert len(contents(events)) == 3
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events)


async def test_truncated_graceful_structured_json_is_unfinished(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    sim.inject(Fault.TRUNCATED, graceful=True)
    _, events = await stream_chat(client, chat_body(response_format=RESPONSE_FORMAT))
    assert "[DONE]" not in events
    assert not _is_json("".join(contents(events)))
    assert (await client.get("/models")).status_code == 200  # the server closed the stream's connection
    assert sim.connections_accepted == 2


async def test_invalid_json_fault_completes_with_bad_content(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    sim.inject(Fault.INVALID_JSON, times=2)
    _, events = await stream_chat(client, chat_body(response_format=RESPONSE_FORMAT))
    assert events[-1] == "[DONE]"
    assert all(_is_json(e) for e in events[:-1])
    assert not _is_json("".join(contents(events)))
    r = await client.post("/chat/completions", json=chat_body(response_format=RESPONSE_FORMAT))
    assert r.status_code == 200 and not _is_json(r.json()["choices"][0]["message"]["content"])


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------ timing / conn


async def test_first_token_delay_is_observable() -> None:
    async with (
        OpenAISimulator(first_token_delay_ms=250) as sim,
        httpx.AsyncClient(base_url=sim.base_url, headers=AUTH) as http,
    ):
        started = time.monotonic()
        async with http.stream("POST", "/chat/completions", json=chat_body(stream=True)) as response:
            first = None
            async for line in response.aiter_lines():
                if line.startswith("data: ") and first is None:
                    first = time.monotonic() - started
        assert first is not None and first >= 0.8 * 0.25
        # per-request override through a plan
        sim.plan_next(RequestPlan(first_token_delay_ms=0))
        started = time.monotonic()
        assert (await http.post("/chat/completions", json=chat_body())).status_code == 200
        fast = time.monotonic() - started
        assert fast < first


async def test_keep_alive_reuses_one_tcp_connection(client: httpx.AsyncClient, sim: OpenAISimulator) -> None:
    assert (await client.get("/models")).status_code == 200
    await stream_chat(client, chat_body())
    assert (await client.post("/chat/completions", json=chat_body())).status_code == 200
    assert sim.connections_accepted == 1
    assert [r.index_on_connection for r in sim.requests] == [1, 2, 3]
    await client.get("/models", headers={"Connection": "close"})
    await client.get("/models")
    assert sim.connections_accepted == 2


async def test_drop_idle_connections_forces_reconnect(
    client: httpx.AsyncClient, sim: OpenAISimulator
) -> None:
    assert (await client.get("/models")).status_code == 200
    assert await sim.drop_connections() == 1
    await asyncio.sleep(0.05)
    assert (await client.get("/models")).status_code == 200
    assert sim.connections_accepted == 2


async def test_admin_plan_endpoint(client: httpx.AsyncClient, sim: OpenAISimulator) -> None:
    async with httpx.AsyncClient() as admin:
        url = f"http://127.0.0.1:{sim.port}/_simulator"
        r = await admin.post(f"{url}/plan", json={"fault": "server_error", "times": 1})
        assert r.json() == {"queued": 1, "pending_plans": 1}
        assert (await client.post("/chat/completions", json=chat_body())).status_code == 500
        stats = (await admin.get(f"{url}/stats")).json()
        assert stats["requests_by_path"]["/v1/chat/completions"] == 1
        assert (await admin.post(f"{url}/plan", json={"fault": "nope"})).status_code == 400


# ------------------------------------------------------------------------------------------ openai SDK


async def test_official_sdk_models_chat_and_stream(sim: OpenAISimulator) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as sdk:
        models = await sdk.models.list()
        assert [m.id for m in models.data] == ["gpt-4o-mini", "gpt-4o", "sim-small"]

        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "привет"}], stream=False
        )
        assert completion.choices[0].message.content == "Вы сказали: привет"
        assert completion.usage is not None and completion.usage.total_tokens > 0

        stream = await sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "поток"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert text == "Вы сказали: поток"
        assert finish == "stop"
        assert usage is not None and usage.completion_tokens == 5

        structured = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "json"}],
            response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
        )
        content = structured.choices[0].message.content
        assert content is not None and json.loads(content)["answer"] == "Вы сказали: json"
    assert sim.connections_accepted == 1


async def test_official_sdk_rate_limit_and_auth_errors(sim: OpenAISimulator) -> None:
    sim.inject(Fault.RATE_LIMIT, retry_after=1)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as info:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.status_code == 429
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"] == "1"
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.models.list()


async def test_official_sdk_timeout(sim: OpenAISimulator) -> None:
    sim.inject(Fault.TIMEOUT)
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0, timeout=0.3) as sdk:
        with pytest.raises(openai.APITimeoutError):
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )


# ------------------------------------------------------------------------------------------ CLI


async def test_cli_prints_started_line_and_serves() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voxcore.simulator",
        "--port",
        "0",
        "--first-token-ms",
        "10",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=8)
        started = json.loads(line)
        assert started["event"] == "simulator_started"
        async with httpx.AsyncClient(base_url=started["base_url"], headers=AUTH) as http:
            assert (await http.get("/models")).status_code == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=8)
    assert proc.returncode == 0
    assert json.loads(out.decode().strip().splitlines()[-1])["event"] == "simulator_stopped"
