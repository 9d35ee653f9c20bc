"""Smoke job: start the cluster, place the model on every LLM pool, generate a few answers, print them."""

from __future__ import annotations

from jobs import lm_eval_phase, mt_bench_phase
from jobs.controller import Controller, main


def smoke(ctl: Controller, roles: tuple[str, ...] = ("generator", "judge", "teacher")) -> None:
    rows, _ = ctl.datasets()
    sampling = ctl.sampling(ctl.config.generation)
    for role in roles:
        outputs = ctl.generate(f"{role}-answers", rows, sampling, role=role)  # each role's configured model
        for row in rows:
            print(f"[{role}] {row['id']}: {outputs[row['id']]['response'][:200]!r}")
    ctl.run.metric("answers", len(rows))
    lm_eval_phase.final(ctl, ctl.base_model)  # evaluation.lm_eval: standard benchmarks on the model
    mt_bench_phase.final(ctl, ctl.base_model)  # evaluation.mt_bench: the final model against the earlier one


if __name__ == "__main__":
    main("smoke", smoke)
