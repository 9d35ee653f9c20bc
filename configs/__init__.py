"""The configs a job runs with: the YAML files and recipes of this folder, and their typed schema and loader.

- ``configs.schema``: every section and key as a dataclass field with its type, default, range and doc
  (``doc(...)``); ``load_config`` (file + ``key=value`` overrides, unknown keys and bad values refused naming the
  key), the redaction of secrets, the phase settings a training phase runs with.
- ``*.yaml``: the CPU configs, the tiny test configs, the GPU profiles; ``recipes/``: each paper's setup at full
  scale. They ship inside the package (pyproject.toml's package data), found by ``jobs.cli.shipped_configs``.

May import: nothing of the project (the bottom layer; every other package reads its config from here).
"""
