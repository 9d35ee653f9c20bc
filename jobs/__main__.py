"""``selfimprove <command> [arguments]``: the jobs as one command (the console script of an installed package;
``python -m jobs <command>`` from a checkout). ``selfimprove spin --config my.yaml`` is ``python -m jobs.spin
--config my.yaml``, ``selfimprove serve ...`` is ``python -m serving.app ...``; ``selfimprove <command> --help``
shows the command's own help."""

from __future__ import annotations

import importlib
import sys

METHODS = ("spin", "s3ft", "llm2llm", "aft", "smoke")
COMMANDS = {
    **{m: f"run {m.upper() if m != 'smoke' else 'the smoke job'} (python -m jobs.{m})" for m in METHODS},
    "serve": "serve a model or a run's final model behind an OpenAI-compatible API (python -m serving.app)",
    "report": "write a run folder's report (python -m jobs.report)",
}
# The module each command runs; the Ray Serve app is its own package (serving/), the others are jobs.<command>.
MODULES = {**{name: f"jobs.{name}" for name in COMMANDS}, "serve": "serving.app"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "usage: selfimprove <command> [arguments]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"selfimprove: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(MODULES[command])
    if command in METHODS:  # jobs.<method> runs its algorithm through jobs.controller.main
        from jobs.controller import main as run_method

        run_method(command, getattr(module, command), rest)
    else:
        module.main(rest)


if __name__ == "__main__":
    main()
