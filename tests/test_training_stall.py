"""A training rank that stops stepping fails its phase after training.stall_timeout_s, naming the rank and its
last step (before, a hung rank or collective hung the driver forever). Its own train pool: the stalled phase
spends the pool's current phase slot."""

import time
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.schema import load_config
from training.service import TrainingError, TrainingService

ROWS = [
    {"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} plus one?"}], "response": f"{i + 1}."}
    for i in range(12)
]


def test_a_rank_that_stops_stepping_fails_the_phase_naming_it(ray_session, tiny_model, tmp_path):
    config = load_config(
        None,
        [
            f"run.dir={tmp_path}",
            "run.id=stall",
            "pools.train.replicas=2",
            "pools.train.num_cpus=1",
            "training.layout=pool",  # two real ranks (auto would run one on this embedded Ray)
            "training.stall_timeout_s=12",
            # rank 1 hangs for 35 s after its first optimizer step; rank 0 then blocks in the next collective
            "pools.train.env={SELFIMPROVE_STALL_AT: 'stalling:1:1:35'}",
        ],
    )
    service = TrainingService(config)
    data = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), data)
    spec = lambda name: {  # noqa: E731
        "name": name,
        "kind": "sft",
        "init_model": tiny_model,
        "data": str(data),
        "phase_dir": str(tmp_path / name),
        "output": str(tmp_path / f"{name}-model"),
        "training": {**asdict(config.training), "micro_batch_size": 2},
        "seed": 0,
    }
    try:
        service.wait_ready(timeout_s=300)
        # A first phase pays the ranks' imports and DeepSpeed set-up (over 45 s on a busy 2-core box, with no step
        # to report): the stall timeout is for a rank that stops once it is training.
        service.stall_timeout_s = 0
        assert service.train(spec("warmup"))["steps"] == 3
        service.stall_timeout_s = config.training.stall_timeout_s
        started = time.monotonic()
        with pytest.raises(TrainingError) as err:
            service.train(spec("stalling"))
        waited = time.monotonic() - started
    finally:
        service.shutdown()
    message = str(err.value)
    assert message.startswith("phase stalling stalled: rank 1 reported nothing for ")
    assert "(training.stall_timeout_s=12); its last step was 1 (stepped)" in message
    assert "rank 0: step 1 (micro step 2" in message  # blocked in its next micro step
    assert waited < 35  # the driver gave up before the rank woke up
    service.thread.join(timeout=300)  # once rank 1 wakes, the ranks finish that phase and find the stop spec
    assert not service.thread.is_alive()
