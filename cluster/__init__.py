"""The Ray cluster: how a job's processes start, find Ray, and get placed on nodes.

- ``environment``: what every process sets before Ray is imported (the checkout root ``PROJECT_ROOT``, Ray's
  console filter, the warnings format); the ``__init__`` of every package that imports ray imports it first.
- ``connect``: join a cluster or embed a local Ray, and the environment of our worker processes.
- ``local``: a real multi-node Ray cluster on one machine (``make cluster-up``).
- ``pools``, ``placement_check``, ``plan``: pools as Ray actor options and placement, whether a config fits the
  nodes, and ``--plan`` (what a job would place, and its memory).
- ``storage``: shared storage checked on every node; ``models``: model references -> local folders (here, not in
  ``actors``, because the plan resolves them before any actor exists); ``kuberay/``: the KubeRay manifests.

May import: configs. Nothing above it (no run folder, data, actors or jobs).
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
