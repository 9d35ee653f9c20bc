"""DeepSpeed checkpoint tags count only when complete (issue 28, item 7).

The folder logic (training.checkpoints) on hand-made tag folders, then the real thing: Ray Train + DeepSpeed ZeRO-3
on 2 CPU ranks with the tiny random model, one rank killed while it writes a tag."""

import json
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from runfolder.state import write_atomic
from training import checkpoints
from training.checkpoints import COMPLETE, LATEST, Tag


def make_tag(ckpt, name, micro_step, world_size=2, complete=True, files=None):
    """A tag folder as the ranks leave it: one shard file per rank, rank 0's model states, and the marker."""
    folder = ckpt / name
    folder.mkdir(parents=True)
    files = files or {
        "mp_rank_00_model_states.pt": 10,
        **{f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt": 20 + r for r in range(world_size)},
    }
    for file, size in files.items():
        (folder / file).write_bytes(b"x" * size)
    if complete:
        checkpoints.mark_complete(ckpt, name, world_size, micro_step, files)
    return folder


def test_each_rank_syncs_and_lists_only_the_files_it_wrote(tmp_path):
    folder = make_tag(tmp_path, "step2", 2, world_size=3, complete=False)
    (folder / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"yy")
    assert checkpoints.sync_own_files(folder, 0) == {
        "mp_rank_00_model_states.pt": 10,
        "zero_pp_rank_0_mp_rank_00_optim_states.pt": 20,
    }
    assert checkpoints.sync_own_files(folder, 1) == {
        "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt": 2,
        "zero_pp_rank_1_mp_rank_00_optim_states.pt": 21,
    }


def test_resume_takes_the_newest_complete_tag_and_says_why_the_others_are_unusable(tmp_path):
    make_tag(tmp_path, "step2", 2)
    make_tag(tmp_path, "step4", 4)
    make_tag(tmp_path, "step6", 6, complete=False)  # a rank died while writing it
    torn = make_tag(tmp_path, "step8", 8)
    (torn / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")  # torn after the marker
    missing = make_tag(tmp_path, "step10", 10)
    (missing / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    make_tag(tmp_path, "step12", 12, world_size=4)
    garbled = make_tag(tmp_path, "step14", 14)
    (garbled / COMPLETE).write_text("{not json")
    # `latest` names the newest tag DeepSpeed was told about; resume never trusts it
    assert (tmp_path / LATEST).read_text() == "step14"

    complete, unusable = checkpoints.scan(tmp_path, world_size=2)
    assert complete == [Tag("step2", 2), Tag("step4", 4)]
    assert unusable["step6"].startswith("no completion marker")
    assert unusable["step8"] == "zero_pp_rank_1_mp_rank_00_optim_states.pt has 1 bytes, 21 when saved"
    assert unusable["step10"] == "zero_pp_rank_0_mp_rank_00_optim_states.pt is missing"
    assert unusable["step12"].startswith("saved by 4 ranks, this phase runs 2")
    assert unusable["step14"].startswith("unreadable completion marker (JSONDecodeError")


def test_pruning_keeps_the_newest_complete_tags_and_drops_incomplete_ones(tmp_path):
    for step in (2, 4, 6):
        make_tag(tmp_path, f"step{step}", step)
    make_tag(tmp_path, "step1", 1, complete=False)
    assert checkpoints.prune(tmp_path, world_size=2, keep=2) == ["step1", "step2"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step4", "step6"]
    assert checkpoints.prune(tmp_path, world_size=2, keep=1) == ["step4"]
    assert checkpoints.scan(tmp_path, 2)[0] == [Tag("step6", 6)]


def test_durable_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / LATEST
    write_atomic(target, "step2")
    write_atomic(target, "step4")
    assert target.read_text() == "step4" and [p.name for p in tmp_path.iterdir()] == [LATEST]


def test_keep_checkpoints_is_a_documented_bounded_setting():
    from configs.schema import ConfigError, describe, load_config

    assert load_config(None, []).training.keep_checkpoints == 2
    assert "Range: >= 1." in dict((k, d) for k, _, d in describe())["training.keep_checkpoints"]
    with pytest.raises(ConfigError, match="training.keep_checkpoints: must be >= 1"):
        load_config(None, ["training.keep_checkpoints=0"])


# -- a rank killed during save_checkpoint, on the real train pool ----------------------------------------------

ROWS = [
    {
        "id": f"r{i}",
        "messages": [{"role": "user", "content": f"What is {i} plus one?"}],
        "response": f"{i} plus one is {i + 1}.",
    }
    for i in range(12)
]


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    from configs.schema import load_config
    from training.service import TrainingService

    root = tmp_path_factory.mktemp("ckpt")
    config = load_config(
        None,
        [
            f"run.dir={root}",
            "run.id=c",
            "pools.train.replicas=2",
            "pools.train.num_cpus=1",
            "training.layout=pool",  # two real ranks (auto would run one on this embedded Ray)
            "pools.train.max_restarts=1",
            # rank 1 dies after the first file it writes for tag step4 (once)
            "pools.train.env={SELFIMPROVE_DIE_WHILE_SAVING: 'torn:1:step4'}",
        ],
    )
    svc = TrainingService(config)
    svc.root, svc.training = root, asdict(config.training)
    yield svc
    svc.shutdown()


@pytest.mark.slow
def test_a_rank_killed_while_saving_resumes_from_the_previous_complete_tag(service, tiny_model):
    data = service.root / "torn.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), data)
    phase_dir = service.root / "torn"
    # 12 rows / (2 ranks x 2) = 3 micro steps per epoch, 2 epochs: 6 optimizer steps, a tag every 2. One kept: at
    # the kill only step2 is on disk, so a resume that trusted `latest` (step4) or kept no older tag fails.
    training = {**service.training, "lr": 2e-3, "epochs": 2, "micro_batch_size": 2}
    training.update(checkpoint_every=2, keep_checkpoints=1)
    spec = {
        "name": "torn",
        "kind": "sft",
        "init_model": tiny_model,
        "data": str(data),
        "phase_dir": str(phase_dir),
        "output": str(service.root / "torn-model"),
        "training": training,
        "seed": 0,
    }
    result = service.train(spec)
    assert (phase_dir / "died-while-saving-1").exists()  # the hook fired: rank 1 died inside save_checkpoint
    assert result["resumed_from_tag"] == "step2" and result["resumed_from_micro_step"] == 2
    assert result["discarded_tags"] == {"step4": "no completion marker (a rank stopped while saving it)"}
    assert result["steps"] == 6 and len(result["losses"]) == 4  # steps 3-6 ran again after the resume
    assert AutoModelForCausalLM.from_pretrained(result["output"]).config.num_hidden_layers > 0
    assert not (phase_dir / "ckpt").exists()  # the finished phase's tags are gone: its HF folder is the result
    print(json.dumps({k: result[k] for k in ("resumed_from_tag", "steps", "wall_s", "startup_s")}))


def test_only_a_broken_collective_counts_as_a_peer_lost():
    from training.worker import peer_lost

    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17841"
    assert peer_lost(RuntimeError(gloo))  # rank 0's error when rank 1 died: Ray Train restarts the group
    assert not peer_lost(RuntimeError("Connection closed by peer"))  # not from gloo
    assert not peer_lost(ValueError("phase x: no training examples"))  # the phase's own error fails it
    assert not peer_lost(RuntimeError("expected scalar type Float but found BFloat16"))
