"""Chat formats (actors/chat.py) on real tokenizers: SmolLM2's ChatML template, a Llama-3-style template given as
model.chat_template, and the plain format of a model without a template (tiny-random-base); then the generator's
stop conditions on a real vLLM engine."""

import logging

import pytest
from transformers import AutoTokenizer

from actors.chat import PLAIN_STOP, PLAIN_TEMPLATE_BOS, chat_format, job_chat_formats, use_chat_template
from actors.engine import HFEngine, Sampling, render_prompt, response_ids, with_format_stops
from cluster.connect import PROJECT_ROOT
from cluster.models import resolve_model
from configs.schema import ConfigError, EngineConfig, PoolConfig, load_config
from training.sequences import TruncationReport, build_sequence

LLAMA3_STYLE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]
ANSWER = "2 plus 3 is 5."


@pytest.fixture(scope="module")
def tiny_base() -> str:
    return resolve_model("tiny-random-base")


def tokenizer_of(path: str):
    return AutoTokenizer.from_pretrained(path)


def target(tokenizer, messages=QUESTION, answer=ANSWER):
    return build_sequence(tokenizer, "x", messages, answer, 512, 256, TruncationReport())


def template_renders(tokenizer, messages: list[dict], answer: str) -> list[int]:
    """The whole exchange as the template itself renders it, tokenized once."""
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}],
        chat_template=chat_format(tokenizer).template,  # the plain format's, for a tokenizer without one
        tokenize=False,
        add_generation_prompt=False,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_smollm2_target_ends_with_the_chatml_end_of_turn(tiny_model):
    tokenizer = tokenizer_of(tiny_model)  # SmolLM2's tokenizer and template
    fmt = chat_format(tokenizer)
    assert not fmt.plain and fmt.turn_end == "<|im_end|>\n" and fmt.stop == [] and fmt.stop_token_ids == []
    seq = target(tokenizer)
    answer = [t for t in seq.labels if t != -100]
    assert tokenizer.decode(answer) == ANSWER + "<|im_end|>\n"
    assert answer[-2:] == [tokenizer.eos_token_id, tokenizer("\n", add_special_tokens=False)["input_ids"][0]]
    # prompt + target are exactly the tokens of the exchange the template renders
    assert seq.input_ids == template_renders(tokenizer, QUESTION, ANSWER)
    assert seq.input_ids[: len(seq.input_ids) - len(answer)] == render_prompt(tokenizer, QUESTION)


def test_llama3_style_model_chat_template_from_a_file_and_inline(tiny_model, tmp_path, caplog):
    path = tmp_path / "llama3.jinja"
    path.write_text(LLAMA3_STYLE)
    for value in (str(path), LLAMA3_STYLE):
        config = load_config(None, [f"model.name={tiny_model}"])
        config.model.chat_template = value
        paths = dict.fromkeys(("model.name", "judge.model", "teacher.model"), tiny_model)
        formats = job_chat_formats(config, paths, PROJECT_ROOT)
        with caplog.at_level(logging.INFO, logger="selfimprove"):
            formats.log()
        templates = formats.templates
        # the judge and the teacher are the base model here: they render as it does
        assert templates == dict.fromkeys(paths, LLAMA3_STYLE)
        logged = [r.getMessage() for r in caplog.records if "chat format of" in r.getMessage()]
        assert len(logged) == 1 and "model.name, judge.model, teacher.model" in logged[0]  # once per model
        assert "'<|eot_id|>'" in logged[0] and "[model.chat_template]" in logged[0]
        caplog.clear()
        tokenizer = tokenizer_of(tiny_model)
        fmt = use_chat_template(tokenizer, templates["model.name"])
        # <|eot_id|> is no token of SmolLM2's vocabulary: plain text, so the generator stops at it as a string
        assert fmt.turn_end == "<|eot_id|>" and fmt.stop == ["<|eot_id|>"]
        seq = target(tokenizer)
        answer = [t for t in seq.labels if t != -100]
        assert tokenizer.decode(answer) == ANSWER + "<|eot_id|>"
        assert answer == tokenizer(ANSWER + "<|eot_id|>", add_special_tokens=False)["input_ids"]
        # The prompt is the generator's own tokens. (Tokenized whole, this vocabulary would split the header's
        # '\n\n' differently before the answer: the trainer keeps the tokens the generator was prompted with.)
        prompt = render_prompt(tokenizer, QUESTION)
        assert seq.input_ids == prompt + answer
        assert tokenizer.decode(seq.input_ids) == tokenizer.decode(template_renders(tokenizer, QUESTION, ANSWER))
        assert tokenizer.decode(render_prompt(tokenizer, QUESTION)).endswith("<|end_header_id|>\n\n")


def test_an_end_of_turn_special_token_other_than_eos_is_a_stop_id(tiny_model):
    tokenizer = tokenizer_of(tiny_model)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    fmt = use_chat_template(tokenizer, LLAMA3_STYLE)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert fmt.turn_end_ids == [eot] and fmt.stop_token_ids == [eot] and fmt.stop == []
    assert response_ids(tokenizer, ANSWER)[-1] == eot
    merged = with_format_stops(Sampling(stop=["END"], stop_token_ids=[7]), tokenizer)
    assert merged.stop == ["END"] and merged.stop_token_ids == [7, eot]


def test_plain_format_round_trips(tiny_base):
    tokenizer = tokenizer_of(tiny_base)
    assert tokenizer.chat_template is None  # the base variant has none
    fmt = chat_format(tokenizer)
    assert fmt.plain and fmt.turn_end_ids == [tokenizer.eos_token_id] and fmt.stop == [PLAIN_STOP]
    prompt = render_prompt(tokenizer, QUESTION)
    # the official SPIN prompt, token for token (this tokenizer adds no bos)
    official = "### Instruction: " + QUESTION[0]["content"] + "\n\n### Response: "
    assert prompt == tokenizer(official)["input_ids"] and tokenizer.decode(prompt) == official
    seq = target(tokenizer)
    answer = [t for t in seq.labels if t != -100]
    assert answer == tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert seq.input_ids == template_renders(tokenizer, QUESTION, ANSWER) == prompt + answer
    # a system message is a leading paragraph; an earlier answer closes with eos before the next instruction
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tokenizer.decode(render_prompt(tokenizer, conversation)) == (
        "Be brief.\n\n### Instruction: Hi\n\n### Response: Hello.<|im_end|>\n\n### Instruction: Bye\n\n### Response: "
    )
    # what the generator returns when the model goes on to a next turn: the answer alone
    assert (
        fmt.clean("5.\n\n") == "5." and chat_format(tokenizer_of(resolve_model("tiny-random"))).clean("5.\n") == "5.\n"
    )


def test_plain_format_starts_with_bos_where_the_tokenizer_adds_one(tiny_base, monkeypatch):
    import actors.chat

    tokenizer = tokenizer_of(tiny_base)
    monkeypatch.setattr(actors.chat, "starts_with_bos", lambda tok: True)  # as Llama 2's tokenizer does
    fmt = chat_format(tokenizer)
    assert fmt.template == PLAIN_TEMPLATE_BOS
    assert render_prompt(tokenizer, QUESTION)[0] == tokenizer.bos_token_id


def test_judge_and_teacher_templates_follow_their_own_model(tiny_model, tiny_base, tmp_path):
    path = tmp_path / "judge.jinja"
    path.write_text(LLAMA3_STYLE)
    config = load_config(
        None, [f"judge.model={tiny_model}", f"teacher.model={tiny_model}", f"judge.chat_template={path}"]
    )
    paths = {"model.name": tiny_base, "judge.model": tiny_model, "teacher.model": tiny_model}
    formats = job_chat_formats(config, paths, PROJECT_ROOT)
    templates = formats.templates
    assert (
        "the plain format" in formats.described["model.name"]
        and "[judge.chat_template]" in formats.described["judge.model"]
    )
    assert "[the model's own]" in formats.described["teacher.model"]
    # the base model has none (plain); the judge its own configured one; the teacher its model's own (None here)
    assert templates == {"model.name": None, "judge.model": LLAMA3_STYLE, "teacher.model": None}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("no/such/template.jinja", "model.chat_template: 'no/such/template.jinja' is neither a file"),
        ("{% for m in messages %}{{ m.content }", "model.chat_template: the chat template cannot render"),
        ("{% for m in messages %}{{ m.role }}{% endfor %}", "model.chat_template: the chat template does not render"),
    ],
)
def test_a_bad_chat_template_is_a_config_error_naming_the_key(tiny_model, tmp_path, value, message):
    from jobs.controller import Controller

    overrides = [f"model.name={tiny_model}", f"run.dir={tmp_path}", "data.train=sst2", "data.n_train=4"]
    config = load_config(None, overrides)
    config.model.chat_template = value
    with pytest.raises(ConfigError, match=message):
        Controller(config)
    assert not list(tmp_path.iterdir())  # refused before the run folder exists


def test_hf_engine_stops_where_the_format_says(tiny_base):
    # The transformers backend stops at the format's stop ids and cuts its text at stop strings, as vLLM does.
    engine = HFEngine(tiny_base, dtype="float32")
    prompt = render_prompt(engine.tokenizer, QUESTION)
    (free,) = engine.generate([prompt], Sampling(temperature=0.0, max_tokens=12))
    tokens = free[0].token_ids
    (by_id,) = engine.generate([prompt], Sampling(temperature=0.0, max_tokens=12, stop_token_ids=[tokens[3]]))
    assert by_id[0].token_ids == tokens[: tokens.index(tokens[3]) + 1] and by_id[0].finish_reason == "stop"
    piece = free[0].text[2:6]
    (by_text,) = engine.generate([prompt], Sampling(temperature=0.0, max_tokens=12, stop=[piece]))
    assert piece not in by_text[0].text and free[0].text.startswith(by_text[0].text)


def test_vllm_generator_on_a_model_without_a_template(ray_session, tiny_base):
    """A real vLLM pool on tiny-random-base: prompts in the plain format, responses scored with eos as their end,
    and a stop id that ends generation at its first occurrence (the plumbing a format's end-of-turn token uses)."""
    from actors.llm_actor import EnginePool

    engine = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=4, batch_size=4, kv_cache_gib=1)
    pool = EnginePool("generator", tiny_base, PoolConfig(replicas=1, num_cpus=1), engine, 240)
    try:
        rows = [{"id": "q", "messages": QUESTION}]
        greedy = Sampling(temperature=0.0, max_tokens=16)
        (out,) = pool.generate_all(rows, greedy).values()
        tokenizer = tokenizer_of(tiny_base)
        assert out["prompt_tokens"] == len(render_prompt(tokenizer, QUESTION))
        tokens = out["samples"][0]["token_ids"]
        stop_at = tokens[4]
        (cut,) = pool.generate_all(rows, Sampling(temperature=0.0, max_tokens=16, stop_token_ids=[stop_at])).values()
        assert cut["samples"][0]["token_ids"] == tokens[: tokens.index(stop_at) + 1]
        assert cut["samples"][0]["finish_reason"] == "stop"
        sampled = pool.generate_all(rows, Sampling(temperature=1.0, max_tokens=24, n=8, seed=0))["q"]["samples"]
        assert all(PLAIN_STOP not in s["text"] and s["text"] == s["text"].rstrip() for s in sampled)
        scored = pool.score_all([{"id": "q", "messages": QUESTION, "response": ANSWER}])["q"]
        assert len(scored) == len(response_ids(tokenizer, ANSWER))  # the answer's tokens and eos
        hf = HFEngine(tiny_base, dtype="float32")
        (expected,) = hf.score([render_prompt(hf.tokenizer, QUESTION)], [response_ids(hf.tokenizer, ANSWER)])
        assert max(abs(a - b) for a, b in zip(scored, expected)) < 1e-3
    finally:
        pool.shutdown()
