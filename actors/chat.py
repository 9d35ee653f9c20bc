"""Chat formats: how a conversation becomes the tokens a model is prompted with and trained to answer with.

Design note: the format lives on the tokenizer, as in transformers, vLLM and TRL. A configured template
(``model.chat_template``, ``judge.chat_template``, ``teacher.chat_template``: a Jinja string or a file, as vLLM's
``--chat-template`` and TRL's ``chat_template_path`` take it) is set as ``tokenizer.chat_template`` wherever a
tokenizer is loaded (engine actors, training ranks, the driver's check); a tokenizer with no template at all (a
base model: Llama-2-7b-hf, Llama-3.1-8B) renders the plain format of the official SPIN code
(``spin/generate_vllm.py``): ``### Instruction: {prompt}\\n\\n### Response: {answer}``, the answer closed by eos.
Everything else derives from the tokenizer's template, once per (tokenizer, template) (``chat_format``):

- the prompt: the template with the generation prompt (``render_prompt``, one function for generator,
  scorer, judge, teacher and trainer);
- the end of turn: what the template renders after the assistant's content, found by rendering a probe
  conversation whose assistant turn is a sentinel and taking what follows it (``<|im_end|>\\n`` for ChatML,
  ``<|eot_id|>`` for Llama 3, ``<end_of_turn>\\n`` for Gemma, eos for the plain format). A training target
  and a scored response are the content's tokens plus these (``response_ids``), so the model learns to close
  its turn exactly as the template does;
- the generator's stop: vLLM stops at eos and the generation config's eos ids. When the end of turn starts
  with another special token (a Llama-3-style template on a base model whose eos is ``<|end_of_text|>``) that
  token id is a stop id too; when it is plain text, its stripped text is a stop string. A base model prompted
  in the plain format tends to go on to a next ``### Instruction``: that is a stop string, and the text it
  leaves is stripped of trailing whitespace (the official code strips its outputs too).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("selfimprove")

PLAIN = "plain"
PLAIN_STOP = "### Instruction"
# One line: Jinja whitespace stays exactly as written. An assistant turn ends with eos (and, when another turn
# follows, the blank line that separates turns); a system message is a leading paragraph.
_PLAIN_BODY = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### Instruction: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Response: ' + message['content'] + eos_token }}"
    "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
    "{%- else -%}{{ raise_exception('the plain chat format has no role ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Response: ' }}{%- endif -%}"
)
PLAIN_TEMPLATE = _PLAIN_BODY
# For a tokenizer that starts every text with bos (Llama 2, Llama 3): the official code prompts vLLM with a
# string, which vLLM tokenizes with the tokenizer's special tokens, so the prompt starts with bos there too.
PLAIN_TEMPLATE_BOS = "{{ bos_token }}" + _PLAIN_BODY
SENTINEL = "SELFIMPROVE_CONTENT_4d1f"
PROBE = [{"role": "user", "content": "Hi"}]
JINJA_CHARS = "{}\n"


class ChatFormatError(ValueError):
    """A template that cannot render a user/assistant exchange, or drops the assistant's content."""


@dataclass(frozen=True)
class ChatFormat:
    template: str  # the Jinja template applied (the tokenizer's own, a configured one, or the plain format's)
    plain: bool  # True: the plain format (the tokenizer has no template)
    turn_end: str  # text the template renders right after the assistant's content
    turn_end_ids: list[int]  # its tokens alone (eos in the plain format): what closes a target and a scored response
    stop: list[str] = field(default_factory=list)  # stop strings the generator needs beyond eos
    stop_token_ids: list[int] = field(default_factory=list)  # stop token ids beyond eos
    prompt_matches: bool = True  # the rendered exchange starts with the generation prompt (see chat_format)

    def describe(self) -> str:
        if self.plain:
            return f"the plain format (### Instruction: ... ### Response: ..., eos {self.turn_end!r} ends a turn)"
        stops = [*self.stop, *self.stop_token_ids]
        extra = f"; generation also stops at {stops}" if stops else ""
        return f"a chat template whose turn ends with {self.turn_end!r}{extra}"

    def clean(self, text: str) -> str:
        """A generated text as the format's answer: the plain format drops the blank line before a next turn."""
        return text.rstrip() if self.plain else text


def tokenizer_template(tokenizer) -> str | None:
    """The tokenizer's own default template (transformers may hold several by name), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def starts_with_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def chat_format(tokenizer) -> ChatFormat:
    """The format of ``tokenizer`` as it is now (its template, else the plain format). Raise ChatFormatError."""
    own = tokenizer_template(tokenizer)
    template = own or (PLAIN_TEMPLATE_BOS if starts_with_bos(tokenizer) else PLAIN_TEMPLATE)
    return _chat_format(tokenizer, template, own is None, len(tokenizer))


@functools.lru_cache(maxsize=32)
def _chat_format(tokenizer, template: str, plain: bool, vocabulary: int) -> ChatFormat:
    """Cached per tokenizer, template and vocabulary size (tokens added later change the end of turn's ids)."""

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    try:
        prompt = render(PROBE, True)
        exchange = render([*PROBE, {"role": "assistant", "content": SENTINEL}], False)
    except Exception as err:  # a Jinja syntax error, or a template that raises on a plain exchange
        raise ChatFormatError(f"the chat template cannot render a user/assistant exchange: {err}") from None
    if exchange.count(SENTINEL) != 1:
        raise ChatFormatError("the chat template does not render the assistant's content once (it drops or repeats it)")
    before, turn_end = exchange.split(SENTINEL)
    eos = tokenizer.eos_token_id
    if plain or (tokenizer.eos_token and turn_end == tokenizer.eos_token):
        turn_end_ids = [eos]  # eos as text may not re-tokenize to its id in every tokenizer
    else:
        turn_end_ids = tokenizer(turn_end, add_special_tokens=False)["input_ids"]
    stop, stop_ids = [], []
    if plain:
        stop.append(PLAIN_STOP)
    elif turn_end_ids and turn_end_ids[0] != eos:
        added = getattr(tokenizer, "added_tokens_decoder", {}).get(turn_end_ids[0])
        if added is not None and added.special:
            stop_ids.append(turn_end_ids[0])
        elif turn_end.strip():
            stop.append(turn_end.strip())
    return ChatFormat(template, plain, turn_end, turn_end_ids, stop, stop_ids, before == prompt)


def use_chat_template(tokenizer, template: str | None) -> ChatFormat:
    """Set a configured template (None: keep the tokenizer's own, or the plain format) and return the format."""
    if template:
        tokenizer.chat_template = template
    return chat_format(tokenizer)


def render_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text: the format's template with the generation prompt."""
    template = chat_format(tokenizer).template
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


def load_chat_template(value: str | None, key: str, root: Path) -> str | None:
    """A configured template: a file (relative paths from ``root``) or the Jinja text itself, as vLLM reads
    ``--chat-template``. Raise ValueError naming ``key`` when it is neither."""
    if not value:
        return None
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    looks_like_jinja = any(c in value for c in JINJA_CHARS)
    if not looks_like_jinja:
        if not path.is_file():
            raise ValueError(f"{key}: {value!r} is neither a file ({path} does not exist) nor a Jinja template")
        return path.read_text()
    return value


@dataclass
class JobChatFormats:
    """The job's chat formats, checked on the driver: what each model key's actors and ranks are handed
    (``templates``: the configured template, or None for the model's own / the plain format) and how each
    renders (``described``), for the driver log and the run's summary."""

    templates: dict[str, str | None]
    described: dict[str, str]
    paths: dict[str, str]

    def log(self, run=None) -> None:
        """Log each model's format once (keys that share a model and a template on one line); record them all
        as the ``chat_format`` summary metric of ``run``."""
        groups: dict[tuple[str, str | None], list[str]] = {}
        for key, template in self.templates.items():
            groups.setdefault((self.paths[key], template), []).append(key)
        for (path, _), keys in groups.items():
            log.info("chat format of %s (%s): %s", ", ".join(keys), path, self.described[keys[0]])
        if run is not None:
            run.metric("chat_format", dict(self.described))


def job_chat_formats(config, model_paths: dict[str, str], root: Path) -> JobChatFormats:
    """The chat formats of model.name, judge.model and teacher.model, checked on the driver before Ray starts
    and before the run folder exists. A judge or teacher without its own ``chat_template`` renders as the base
    model does when it is the base model (its ``model`` None), else with its model's own template: a template
    belongs to a tokenizer, and another model's special tokens mean nothing to it. Raise ValueError naming the
    key."""
    from transformers import AutoTokenizer

    base = load_chat_template(config.model.chat_template, "model.chat_template", root)
    templates: dict[str, str | None] = {"model.name": base}
    sources: dict[str, str | None] = {"model.name": "model.chat_template" if base else None}
    for section in ("judge", "teacher"):
        own = getattr(config, section)
        configured = load_chat_template(own.chat_template, f"{section}.chat_template", root)
        key = f"{section}.model"
        if configured:
            templates[key], sources[key] = configured, f"{section}.chat_template"
        elif own.model is None:
            templates[key], sources[key] = base, sources["model.name"]
        else:
            templates[key], sources[key] = None, None
    described: dict[str, str] = {}
    known: dict[tuple[str, str | None], str] = {}
    for key, template in templates.items():
        path = model_paths[key]
        if (path, template) not in known:  # each model and template checked once
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.model.trust_remote_code)
            source = sources[key] or ("the model's own" if tokenizer_template(tokenizer) else "the model has none")
            try:
                fmt = use_chat_template(tokenizer, template)
            except ChatFormatError as err:
                raise ValueError(f"{sources[key] or f'{key} ({path})'}: {err}") from None
            known[(path, template)] = f"{fmt.describe()} [{source}]"
            if not fmt.prompt_matches:
                log.warning(
                    "%s: the template renders an answered exchange differently from its generation prompt; "
                    "prompts use the generation prompt and targets the content plus %r, as the generator sees them",
                    key,
                    fmt.turn_end,
                )
        described[key] = known[(path, template)]
    return JobChatFormats(templates, described, dict(model_paths))
