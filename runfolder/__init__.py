"""The run record: everything a job writes into ``runs/<method>/<run-id>/`` and reads back to resume.

- ``run``: ``Run``, the run folder's phases with resume (row, block and keyed phases), metrics, the closing
  summary, W&B and the memory monitor.
- ``state``: a safe run folder: the driver lease with fencing, config and input fingerprints, run-control keys,
  atomic writes.
- ``blocks``: rows too many for the driver, as a folder of Parquet parts read a block at a time.
- ``lineage``: W&B lineage, one small W&B run per finished phase.

May import: configs. Nothing above it: it knows rows, not what made them.
"""
