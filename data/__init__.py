"""Datasets -> rows: the one row schema every method reads, and the train / eval sets a job runs on.

- ``rows``: the row schema, built-in datasets, readers (files, hub datasets), splits, the overlap check between
  training and eval prompts, and ``prepare`` (a job's checked inputs, before Ray starts).
- ``formats``: one user row in any of TRL's dataset formats -> a row.
- ``streaming``: a data.train too large for the driver, read by Ray Data into the run folder a block at a time.

May import: configs, runfolder (streaming writes into the run folder), cluster (its environment only).
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
