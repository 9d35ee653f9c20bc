"""What every process of the project sets up before anything imports Ray: the checkout root, Ray's console
filter and the format of known-harmless warnings.

Ray reads ``RAY_DEDUP_LOGS_SKIP_REGEX`` when it is imported, so this module must run first. It does by a checked
rule, not by import order: the ``__init__`` of every package that imports ray (or vllm, deepspeed) imports this
module before anything else (``tests/test_layout.py`` checks it), so ``python -m jobs.spin``, a Ray worker that
unpickles an actor of ``actors`` or a training rank of ``training`` all pass here first. Imports nothing of the
project.
"""

import os
import re
import warnings
from pathlib import Path

# The checkout (or, installed, site-packages): the folder that holds the packages. Relative paths the configs
# name (prompts_dir, model.cache_dir, ...) are resolved against it; cluster.connect puts it on the workers' path.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Known-harmless library output: lines every run prints that ask nothing of the user (each a consequence of a
# setting made here on purpose, or a library's chatter about its own internals). Ray leaves worker lines that match
# one out of the driver's console (RAY_DEDUP_LOGS_SKIP_REGEX: Ray reads it when it is imported, and every entry
# point imports this module before ray; a user's own value wins); cluster.connect still writes every worker line
# to driver.log. Warnings that ask something of the user (vLLM's LD_PRELOAD performance advice) stay on the console.
HARMLESS_OUTPUT = (
    # Ray Train V2's PlacementGroupCleaner asks the State API (served by the dashboard) whether the train
    # controller lives, every second; with the embedded default's dashboard off each ask fails with a warning.
    "Failed to query Ray Train Controller actor state",
    # DeepSpeed's collectives in the Ray Train ranks call torch.distributed names torch renamed (FutureWarning,
    # once per rank and collective); vLLM's Triton shim touches another.
    r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|reduce_op)` is deprecated",
    # torch's notice at each vLLM CPU worker start that it binds memory to the NUMA node of its cores.
    "Warning: NUMA binding: Using MEMBIND policy",
    # vLLM at each engine build, about settings this project makes on purpose (engine.enforce_eager,
    # engine.enable_chunked_prefill, the in-process engine core, its thread binding) or the CPU build (no Triton).
    "The global random seed is set to .* VLLM_ENABLE_V1_MULTIPROCESSING is set to False",
    "This model does not officially support disabling chunked prefill",
    "Enforce eager set, disabling torch.compile",
    "Inductor compilation was disabled by user settings",
    "Triton is not installed. triton-cpu is expected",
    "Triton is installed, but doesn't include CPU backend",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type to float32",
    "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",
    # vLLM's INFO lines (its own format: "INFO 12-01 22:59:18 [file.py:286] ...", ~25 per engine build, 4 per
    # reload) and its weight-loading progress bar: driver.log has them; its WARNING and ERROR lines stay visible.
    r"INFO \d\d-\d\d \d\d:\d\d:\d\d \[[\w.]+:\d+\]",
    "Loading safetensors checkpoint shards:",
)
HARMLESS = re.compile("|".join(f"({pattern})" for pattern in HARMLESS_OUTPUT))
os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", HARMLESS.pattern)

_format_warning = warnings.formatwarning


def _harmless_on_one_line(message, category, filename, lineno, line=None) -> str:
    """Python prints a warning and then its source line; a known-harmless one is printed on one line, so that
    Ray's filter leaves all of it off the console (not an orphaned ``  return func(*args, **kwargs)``)."""
    if HARMLESS.search(str(message)):
        return f"{filename}:{lineno}: {category.__name__}: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


warnings.formatwarning = _harmless_on_one_line
