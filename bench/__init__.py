"""Benchmarks that print a table and, last, one JSON line (``python -m bench.<name>`` or ``python bench/<name>.py``).

May import: every package (the top layer; nothing imports bench).
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
