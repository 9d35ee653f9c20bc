"""Ray Serve app with an OpenAI-compatible endpoint, over HTTP on loopback, real vLLM (AsyncLLM) on tiny-random:
API key, caps and a 400 with its reason for each bad input, concurrent requests served concurrently, and the official
``openai`` client: model list, streamed chat completions (SSE chunks), errors as the client's exceptions."""

import json
import secrets
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import asdict

import pytest

from cluster.config import EngineConfig, PoolConfig, ServeConfig

API_KEY = secrets.token_hex(16)
MAX_MODEL_LEN = 512
HELLO = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body, key: str | None = API_KEY, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=raw if raw is not None else json.dumps(body).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(ray_session, tiny_model):
    from ray import serve

    from jobs.serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = asdict(EngineConfig(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=8))
    pool = PoolConfig(replicas=1, num_cpus=0.5)
    serve.run(build_app(tiny_model, engine, pool, ServeConfig(), API_KEY), route_prefix="/", name="chat")
    yield port
    serve.shutdown()


def test_chat_completion_openai_shape(server):
    body = {"messages": HELLO, "max_tokens": 5, "n": 2, "temperature": 1.0, "seed": 3}
    status, out = post(server, body)
    assert status == 200 and out["object"] == "chat.completion", out
    assert len(out["choices"]) == 2 and all(c["message"]["role"] == "assistant" for c in out["choices"])
    assert out["usage"]["completion_tokens"] > 0 and out["usage"]["prompt_tokens"] > 0
    again = post(server, body)[1]
    assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in out["choices"]]


def test_propose_and_aggregate_mode(server):
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 4}
    status, out = post(server, {**body, "aggregate": {"n_proposals": 3, "layers": 2}})
    assert status == 200 and isinstance(out["choices"][0]["message"]["content"], str), out
    assert [len(layer) for layer in out["aggregation"]["layers"]] == [3, 3, 1]


BAD_REQUESTS = [
    ("bad JSON", None, b'{"messages": [', "body is not valid JSON"),
    ("not an object", [1, 2], None, "body must be a JSON object"),
    ("no messages", {"max_tokens": 4}, None, "'messages' must be a non-empty list"),
    ("empty messages", {"messages": []}, None, "'messages' must be a non-empty list"),
    ("message without role", {"messages": [{"content": "hi"}]}, None, "messages[0] has no 'role'"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, None, "messages[0].role must be one of"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, None, "messages[0].content must be a string"),
    ("non-numeric temperature", {"messages": HELLO, "temperature": "hot"}, None, "'temperature' must be a number"),
    ("temperature out of range", {"messages": HELLO, "temperature": 7}, None, "'temperature' must be in [0, 2]"),
    ("NaN top_p", None, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', "'top_p' must be a number"),
    ("n above the cap", {"messages": HELLO, "n": 1000}, None, "'n' must be in [1, 8]"),
    ("fractional n", {"messages": HELLO, "n": 1.5}, None, "'n' must be an integer"),
    ("max_tokens above the cap", {"messages": HELLO, "max_tokens": 10**6}, None, "'max_tokens' must be in [1, 1024]"),
    ("zero max_tokens", {"messages": HELLO, "max_tokens": 0}, None, "'max_tokens' must be in [1, 1024]"),
    ("seed not an integer", {"messages": HELLO, "seed": "abc"}, None, "'seed' must be an integer"),
    ("too many stop strings", {"messages": HELLO, "stop": list("abcde")}, None, "'stop' takes at most 4"),
    ("stream not a boolean", {"messages": HELLO, "stream": "yes"}, None, "'stream' must be true or false"),
    (
        "too many proposals",
        {"messages": HELLO, "aggregate": {"n_proposals": 50, "layers": 1}},
        None,
        "'aggregate.n_proposals' must be in [1, 8]",
    ),
    (
        "too many layers",
        {"messages": HELLO, "aggregate": {"n_proposals": 2, "layers": 40}},
        None,
        "'aggregate.layers' must be in [1, 3]",
    ),
    ("aggregate with n", {"messages": HELLO, "n": 2, "aggregate": {}}, None, "'n' must be 1 with 'aggregate'"),
    (
        "greedy aggregate",
        {"messages": HELLO, "temperature": 0, "aggregate": {"n_proposals": 3}},
        None,
        "'temperature' must be > 0 with 'aggregate'",
    ),
    (
        "over-long prompt",
        {"messages": [{"role": "user", "content": "word " * 2 * MAX_MODEL_LEN}]},
        None,
        f"the model's context is {MAX_MODEL_LEN} tokens",
    ),
]


@pytest.mark.parametrize("name, body, raw, reason", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_a_400_with_its_reason(server, name, body, raw, reason):
    status, out = post(server, body, raw=raw)
    assert status == 400, (status, out)
    assert reason in out["error"]["message"], out


def test_body_over_the_cap_is_refused_unread(server):
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * (ServeConfig().max_body_bytes + 1)}]})
    status, out = post(server, None, raw=huge.encode())
    assert status == 413 and "exceeds the limit of" in out["error"]["message"], out


def test_api_key_is_required_when_set(server):
    assert post(server, {"messages": HELLO, "max_tokens": 2}, key=None)[0] == 401
    status, out = post(server, {"messages": HELLO, "max_tokens": 2}, key="not-the-key")
    assert status == 401 and "API key" in out["error"]["message"]
    assert post(server, {"messages": HELLO, "max_tokens": 2})[0] == 200


def test_concurrent_requests_are_in_the_engine_together(server):
    """No global lock: two requests sent at once are in the engine together. Their intervals in the engine
    (first scheduled .. last token, the engine's own timestamps) overlap; served one after the other, the
    second would be scheduled only after the first's last token."""
    results: dict[int, tuple[int, dict]] = {}
    barrier = threading.Barrier(2)

    def send(i: int) -> None:
        barrier.wait()
        body = {"messages": [{"role": "user", "content": f"Story {i}"}], "max_tokens": 96, "temperature": 1.0}
        results[i] = post(server, body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (status_a, a), (status_b, b) = results[0], results[1]
    assert status_a == status_b == 200, results
    # tiny-random hardly ever emits its end token: both really generated for a while
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"] == 96
    first, second = sorted((a["timing"], b["timing"]), key=lambda t: t["engine_start"])
    assert second["engine_start"] < first["engine_end"], f"one after the other in the engine: {first}, {second}"


def client(port: int, key: str | None = API_KEY):
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=key or "not-the-key", timeout=300, max_retries=0
    )


def test_openai_client_lists_the_model(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == ["selfimprove"] and models[0].owned_by == "selfimprove"
    status, out = post(server, {"messages": HELLO, "max_tokens": 2})
    assert status == 200 and out["model"] == models[0].id


def test_openai_client_streams_the_greedy_answer(server):
    request = {"model": "selfimprove", "messages": HELLO, "max_tokens": 12, "temperature": 0.0, "seed": 5}
    whole = client(server).chat.completions.create(**request)
    chunks = list(client(server).chat.completions.create(**request, stream=True))
    assert len(chunks) >= 2 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # tokens as the engine produces them, not one chunk with everything
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1


def test_openai_client_streams_each_choice(server):
    request = {"model": "selfimprove", "messages": HELLO, "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2}
    whole = client(server).chat.completions.create(**request)
    texts, finish = {0: "", 1: ""}, {}
    for c in client(server).chat.completions.create(**request, stream=True):
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert set(finish) == {0, 1}


def test_openai_client_streams_the_aggregate_answer(server):
    # temperature > 0: vLLM refuses n > 1 proposals with greedy sampling
    request = {"model": "selfimprove", "messages": HELLO, "max_tokens": 4, "temperature": 1.0, "seed": 1}
    extra = {"aggregate": {"n_proposals": 2, "layers": 1}}
    whole = client(server).chat.completions.create(**request, extra_body=extra)
    chunks = list(client(server).chat.completions.create(**request, extra_body=extra, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_client_errors(server):
    import openai

    with pytest.raises(openai.BadRequestError, match="'temperature' must be in"):
        client(server).chat.completions.create(model="selfimprove", messages=HELLO, temperature=7, stream=True)
    too_long = [{"role": "user", "content": "word " * 2 * MAX_MODEL_LEN}]
    with pytest.raises(openai.BadRequestError, match="the model's context is"):
        client(server).chat.completions.create(model="selfimprove", messages=too_long, stream=True)
    with pytest.raises(openai.AuthenticationError):
        client(server, key=None).chat.completions.create(model="selfimprove", messages=HELLO, stream=True)
    with pytest.raises(openai.AuthenticationError):
        client(server, key=None).models.list()


def test_replicas_take_resources_from_the_gpu_profile():
    """`--config configs/gpu-1node-8xh100.yaml`: replicas, GPUs and tensor parallelism come from pools.generator,
    and the replicas get only the key's digest."""
    from cluster.config import load_config
    from jobs.serve import build_app, key_digest

    config = load_config("configs/gpu-1node-8xh100.yaml")
    pool = config.pools.generator
    assert pool.num_gpus >= 1 and pool.tensor_parallel_size >= 2
    deployment = build_app("/m", asdict(config.engine), pool, config.serve, API_KEY)._bound_deployment
    assert deployment.num_replicas == pool.replicas
    assert deployment.ray_actor_options["num_gpus"] == pool.num_gpus
    assert deployment.ray_actor_options["num_cpus"] == pool.num_cpus
    model_path, engine, limits, digest, tensor_parallel_size, _ = deployment.init_args
    assert tensor_parallel_size == pool.tensor_parallel_size and limits == asdict(config.serve)
    assert digest == key_digest(API_KEY) and API_KEY not in repr(deployment.init_args)


def test_a_run_folder_serves_its_final_model(tmp_path, tiny_model):
    """--model (and the RayService's args.model) may name a run folder: its state.json's final_model is served."""
    from pathlib import Path

    from jobs.serve import serving_model

    run = tmp_path / "aft" / "main"
    run.mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(FileNotFoundError, match="has no final model"):
        serving_model(str(run), ".cache/models")
    (run / "state.json").write_text(json.dumps({"metrics": {"final_model": tiny_model}}))
    assert serving_model(str(run), ".cache/models") == str(Path(tiny_model).resolve())
    with pytest.raises(FileNotFoundError, match="--model"):
        serving_model(str(tmp_path / "nothing"), ".cache/models")
