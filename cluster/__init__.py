"""Cluster side of the project: config, Ray connection, pools, models, data, run folder and tracking."""

import os

# Ray Train V2's PlacementGroupCleaner asks the State API (served by the dashboard) whether the train
# controller lives, every second; with the embedded default's dashboard off each ask fails with a warning
# that floods the driver's output. Ray reads this variable when it is imported, and every entry point
# imports this package before ray; a user's own value wins.
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", "Failed to query Ray Train Controller actor state")
