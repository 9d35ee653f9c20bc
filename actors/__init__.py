"""The LLMs on Ray: the engine interface (vLLM, transformers; token ids in, text + token ids + log-probs out),
chat formats, the LLM actor and its pool, the judge, the teacher, their prompt files, and the lm-eval runner with
its offline tasks. Thin: what to ask and what an answer means live in methods/ and data/.

May import: configs, cluster, runfolder, data, methods.
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
