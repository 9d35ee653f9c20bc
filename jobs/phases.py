"""The controller's phases as the modules behind it see them: what ``jobs.evaluation``, ``jobs.lm_eval_phase`` and
``jobs.mt_bench_phase`` are written in.

The ``Controller`` (``jobs.controller``) hands ``evaluate`` and the lm-eval hooks on to those modules, and they
call back into its phases. Typing that call-back with the ``Controller`` class made the modules import each other;
this protocol names the few members they use instead, so the imports point one way (controller -> evaluation ->
phases). ``Controller`` satisfies it by its shape: nothing subclasses it. Imports nothing at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from actors.engine import Sampling
    from actors.judge import Judge
    from actors.llm_actor import EnginePool
    from configs.schema import JobConfig, SamplingConfig
    from runfolder.blocks import Blocks
    from runfolder.run import Run


class Phases(Protocol):
    """The members of ``jobs.controller.Controller`` that evaluation and the lm-eval and MT-Bench phases use."""

    config: JobConfig
    run: Run
    chat_templates: dict[str, str | None]  # {config key: configured template or None}

    @property
    def judge(self) -> Judge: ...

    def pool(self, role: str, model: str | None = None) -> EnginePool: ...

    @property
    def generator(self) -> EnginePool: ...

    def use_generator_weights(self, model_path: str) -> None: ...

    def source(self, rows: list[dict] | Blocks) -> str | None: ...

    def sampling(self, section: SamplingConfig, salt: int = 0, **overrides) -> Sampling: ...

    def generate(
        self,
        name: str,
        rows: list[dict] | Blocks,
        sampling: Sampling,
        iteration: int = 0,
        role: str = "generator",
    ) -> dict[str, dict] | Blocks: ...

    def judge_equivalence(
        self, name: str, rows: list[dict], responses: dict[str, str], uses: list[str] | None = None
    ) -> dict[str, str]: ...
