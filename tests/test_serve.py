"""Ray Serve app with an OpenAI-compatible endpoint, over HTTP on loopback, real vLLM on tiny-random."""

import json
import socket
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest

from cluster.config import EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(ray_session, tiny_model):
    from ray import serve

    from cluster.connect import worker_env
    from jobs.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = asdict(EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=8))
    serve.run(build_app(tiny_model, engine, num_cpus=0.5, env=worker_env()), route_prefix="/", name="chat")
    yield port
    serve.shutdown()


def test_chat_completion_openai_shape(server):
    status, body = post(
        server,
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3},
    )
    assert status == 200 and body["object"] == "chat.completion"
    assert len(body["choices"]) == 2 and all(c["message"]["role"] == "assistant" for c in body["choices"])
    assert body["usage"]["completion_tokens"] > 0 and body["usage"]["prompt_tokens"] > 0
    again = post(
        server,
        {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3},
    )[1]
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in body["choices"]]


def test_propose_and_aggregate_mode(server):
    status, body = post(
        server,
        {
            "messages": [{"role": "user", "content": "Name a color."}],
            "max_tokens": 4,
            "aggregate": {"n_proposals": 3, "layers": 2},
        },
    )
    assert status == 200 and isinstance(body["choices"][0]["message"]["content"], str)
    assert [len(layer) for layer in body["aggregation"]["layers"]] == [3, 3, 1]


def test_bad_request_is_a_400(server):
    status, _ = post(server, {"messages": []})
    assert status == 400
