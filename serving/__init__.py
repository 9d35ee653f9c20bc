"""The Ray Serve app: a trained model behind an OpenAI-compatible API (``serving.app``: ray.serve.llm's
``LLMServer`` as the HTTP ingress, our guard in front: API key, request checks and caps, SSE, AFT's
propose-and-aggregate). ``python -m serving.app``, ``selfimprove serve``, and the RayService's
``import_path: serving.app:app_builder``.

May import: configs, cluster, runfolder, data, methods, actors. Not jobs: serving runs no job.
"""

import cluster.environment  # noqa: F401  first: Ray reads RAY_DEDUP_LOGS_SKIP_REGEX when it is imported
