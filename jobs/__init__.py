"""The commands a user runs, and the Controller they are written in.

- Commands: one driver per method (``spin``, ``s3ft``, ``llm2llm``, ``aft``: each reads top to bottom as its
  paper), ``smoke``, ``report``, ``cli`` (``--help``, ``--print-config``, ``--plan``, ``--check-data``), and
  ``selfimprove <command>`` (``__main__``).
- The Controller: ``controller`` (the phases every driver is written in), ``roles`` (which pool serves each role,
  placed on first use), ``evaluation``, ``lm_eval_phase``, ``inputs`` (the checked inputs, streamed or not), and
  ``phases`` (the part of the Controller that evaluation and the lm-eval phase see, so they need not import it).

May import: every package but bench (the top but one layer).
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
