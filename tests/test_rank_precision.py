"""Ranks of one phase must compute in one precision: training.deepspeed.bf16 'native' resolves on each rank's own
node, so two nodes of different kinds (one CPU with bf16, one without) would mix precisions that no phase key names.
Two real gloo ranks on this machine stand for such nodes: one of them runs with oneDNN capped below bf16."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from training.worker import native_bf16

NATIVE = {"bf16": "native", "bf16_rounding": "stochastic"}


def _rank(rank: int, store: str, capped_ranks: tuple[int, ...], errors) -> None:
    from training.worker import check_ranks_agree_on_precision, precision_name

    if rank in capped_ranks:
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        check_ranks_agree_on_precision("sft", precision_name(NATIVE))
        errors[rank] = ""
    except ValueError as err:
        errors[rank] = str(err)
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, capped_ranks: tuple[int, ...]) -> list[str]:
    errors = mp.Manager().list(["not run", "not run"])
    mp.spawn(_rank, args=(str(tmp_path / f"store-{len(capped_ranks)}"), capped_ranks, errors), nprocs=2)
    return list(errors)


def test_ranks_that_resolve_native_bf16_differently_stop_with_one_error(tmp_path):
    assert run_ranks(tmp_path, ()) == ["", ""]  # one kind of node: one precision, no error
    assert run_ranks(tmp_path, (0, 1)) == ["", ""]  # both capped: both fp32
    mixed = run_ranks(tmp_path, (1,))
    if not native_bf16():  # this CPU has no bf16: 'native' is fp32 with or without the cap
        assert mixed == ["", ""]
        return
    expected = (
        "phase sft: the ranks resolved training.deepspeed.bf16 to different precisions (rank 0: bf16 compute, "
        "stochastic rounding, fp32 weights; rank 1: fp32); set training.deepspeed.bf16 to true or false, or place "
        "the train pool on one kind of node"
    )
    assert mixed == [expected, expected]
