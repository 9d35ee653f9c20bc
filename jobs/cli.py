"""The jobs' command line: ``--help`` lists every config key, ``--print-config`` prints the resolved config.

The key listing is generated from the dataclasses in ``configs.schema`` (as HfArgumentParser does for TRL):
each key under its section, with its type, its default (the value a job gets when neither the config file
nor an override sets it) and its doc, so the help can never drift from what the loader accepts.

``--config`` takes a file, or the name of a config that ships with the code (``spin``, ``spin-tiny``,
``recipes/spin``; default: the job's own ``<method>``): the ``configs`` package's folder, the checkout's
``configs/`` or its copy an installed package carries (pyproject.toml ships its YAML files as package data), so
``selfimprove spin`` runs from any directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from cluster.environment import PROJECT_ROOT
from configs.schema import ConfigError, JobConfig, embedded_auth_mode, load_config, redact_secrets, to_dict

WIDTH = 100


def type_name(hint: Any) -> str:
    """A type hint as a reader writes it: 'float', 'str | None', "'sigmoid' | 'hinge'", 'list[float]'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _default_text(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def config_reference(config: Any = None, prefix: str = "") -> list[str]:
    """Help lines for every key of ``config`` (a JobConfig by default), grouped by section."""
    config = JobConfig() if config is None else config
    hints = typing.get_type_hints(type(config))
    lines: list[str] = []
    leaves = [f for f in dataclasses.fields(config) if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in dataclasses.fields(config) if dataclasses.is_dataclass(hints[f.name])]
    for f in leaves:
        key = f"{prefix}{f.name}"
        bounds = f.metadata.get("bounds")
        text = f.metadata.get("doc", "") + (f" Range: {bounds.text}." if bounds else "")
        lines.append(f"  {key}  ({type_name(hints[f.name])}, default {_default_text(getattr(config, f.name))})")
        lines.extend(textwrap.wrap(text, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    for f in sections:
        key = f"{prefix}{f.name}"
        lines.append("")
        lines.append(f"{key}: {f.metadata.get('doc', '')}")
        lines.extend(config_reference(getattr(config, f.name), key + "."))
    return lines


def shipped_configs() -> Path:
    """The folder of the configs that ship with the code: the ``configs`` package, in a checkout or installed
    (found from the code, not the working directory)."""
    return PROJECT_ROOT / "configs"


def shipped_config_names() -> list[str]:
    folder = shipped_configs()
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def resolve_config_path(value: str) -> Path:
    """``--config``'s value as a file: an existing file as given, else a shipped config by name (``spin``,
    ``spin.yaml``, ``recipes/spin``, or the checkout spelling ``configs/spin.yaml``). Raise ConfigError when it is
    neither, listing the shipped names."""
    given = Path(value).expanduser()
    if given.is_file():
        return given
    if not given.is_absolute():
        folder = shipped_configs()
        name = given.as_posix().removeprefix("configs/")
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(
        f"--config: {value!r} is neither a file nor a shipped config ({', '.join(shipped_config_names())})"
    )


def _job_defaults(method: str) -> JobConfig:
    defaults = JobConfig()
    defaults.run.method = method  # what the job sets; every other default is the dataclasses'
    return defaults


def parse_job_args(
    method: str, argv: list[str] | None = None, dry_run: Callable[[JobConfig], int] | None = None
) -> JobConfig:
    """Parse a job's command line into its validated config; ``--print-config`` prints it and exits 0, a
    config error prints ``config error: <key>: <reason>`` and exits 2. ``dry_run``: what ``--dry-run`` calls with
    the config (the job's walk over its phases, ``jobs.controller.dry_run``); its return is the exit status."""
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{method}",
        description=(
            f"Run the {method} job: a YAML config file, then dotted overrides section.key=value "
            "(e.g. training.lr=1e-6 data.columns.prompt=question). Every key:"
        ),
        epilog="\n".join(config_reference(_job_defaults(method))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=method,
        help="YAML config file, or the name of a shipped config (spin, spin-tiny, recipes/spin, ...; default: "
        "%(default)s, the shipped configs/%(default)s.yaml)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config (file + overrides + defaults) and exit"
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="load and check the data as the job would (formats, bad rows, overlap), print what it found and exit",
    )
    parser.add_argument(
        "--plan",
        action="store_true",
        help="place the pools on cluster.node_groups and estimate each GPU's memory (training and vLLM), print it "
        "and exit: 0 if it fits, 2 and the reasons if not (offline; nothing is started)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="for each phase, say whether a rerun in this run folder would reuse it or run it, and why (never ran, "
        "half done, which inputs of its key changed, or an upstream phase runs again), and exit (the folder is "
        "only read: no Ray, no vLLM, no training)",
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value (values parsed as YAML)")
    args = parser.parse_args(argv)
    try:
        config = load_config(resolve_config_path(args.config), [f"run.method={method}", *args.overrides])
        if not (args.print_config or args.check_data or args.plan or args.dry_run):  # a job that will start Ray
            embedded_auth_mode(config.cluster, os.environ)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(redact_secrets(to_dict(config)), sort_keys=False))
        raise SystemExit(0)
    if args.check_data:
        raise SystemExit(check_data(config))
    if args.plan:
        from cluster.plan import print_plan

        raise SystemExit(print_plan(config))
    if args.dry_run:
        if dry_run is None:
            print(f"--dry-run: python -m jobs.{method} has no phases to walk", file=sys.stderr)
            raise SystemExit(2)
        raise SystemExit(dry_run(config))
    return config


def check_data(config: JobConfig) -> int:
    """What a job would train and evaluate on, without starting anything: 0 if usable, 2 (and why) if not."""
    from data.rows import DataError, prepare

    try:
        data = prepare(config.data, config.run.seed, config.run.method)
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    for report in data.reports:
        print(report)
        for where, reason in report.bad_rows[5:]:  # the summary line quotes the first five
            print(f"  {where}: {reason}")
    if data.shards:  # reading them needs Ray: the job does it first, with the same checks
        print(
            f"data.train streams from {len(data.shards)} shard(s) (data.streaming), read when the job starts: "
            f"{', '.join(data.shards[:3])}{' ...' if len(data.shards) > 3 else ''}"
        )
        print(f"eval rows: {len(data.eval)} ({data.eval_source})")
        return 0
    print(f"train rows: {len(data.train)}, eval rows: {len(data.eval)} ({data.eval_source}), overlap: {data.overlap}")
    first = data.train[0]
    print("first training row:", json.dumps({k: first[k] for k in ("id", "messages", "reference")}, ensure_ascii=False))
    return 0
