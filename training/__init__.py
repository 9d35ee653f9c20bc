"""Ray Train + DeepSpeed: pure losses, sequence building, the worker loop of every rank, complete-only
checkpoints, and the driver-side service that feeds one long-lived ``fit()`` a phase at a time.

May import: configs, cluster, runfolder, data, methods, actors (the chat format and the engine's sequences).
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
