"""Run folders: one driver at a time, resume only under the same config, corrupt state, safe deletion, failed rows.

Drivers here are real processes (``python -m jobs.spin``) or the real ``Run``; no Ray is needed until a driver
gets past its run folder, so these tests stop drivers before or right after that point.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from configs.schema import load_config
from runfolder.run import PhaseFailedError, Run
from runfolder.state import LEASE_FILE, RunFolderError, RunLease, check_inside, machine_identity

ROOT = Path(__file__).resolve().parent.parent


def config(run_dir: Path, *overrides: str):
    return load_config(ROOT / "configs/spin-tiny.yaml", [f"run.dir={run_dir}", "tracking.mode=disabled", *overrides])


def driver(run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.spin",
        "--config",
        "configs/spin-tiny.yaml",
        f"run.dir={run_dir}",
        "tracking.mode=disabled",
        *overrides,
    ]


def _kill_tree(proc: subprocess.Popen) -> None:
    """Stop the driver this test started and the processes it started (never `ray stop`)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def holder(folder: Path) -> dict | None:
    """The record of the driver holding ``folder`` (the newest lease generation), as a second driver reads it."""
    return RunLease(folder, timeout_s=60).holder()


def test_second_driver_on_a_run_folder_exits_at_once_naming_the_holder(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    folder = tmp_path / "spin" / "tiny"
    first = subprocess.Popen(
        driver(tmp_path),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while holder(folder) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        held = holder(folder)
        assert held["pid"] == first.pid and held["host"] == socket.gethostname()
        started = time.monotonic()
        second = subprocess.run(driver(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first driver must still be running for this test to mean anything"
    finally:
        _kill_tree(first)  # the driver and the embedded Ray it started: exactly these processes
        first.wait()
    assert second.returncode == 3
    assert f"pid {first.pid}" in second.stderr and "in use by another driver" in second.stderr
    assert time.monotonic() - started < 60  # at once: no Ray started, no model loaded
    assert holder(folder)["pid"] == first.pid  # the loser did not touch the holder's lease


def _race(run_dir: str, start_at: float, results, everyone_tried) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    lease = RunLease(Path(run_dir), timeout_s=60)
    try:
        lease.acquire()
        results.put(("won", os.getpid()))
        everyone_tried.wait(120)  # held until every racer has tried: a late starter must meet a live lease
        lease.release()
    except RunFolderError as err:
        results.put(("lost", str(err)))


def test_of_drivers_starting_together_exactly_one_gets_the_folder(tmp_path):
    context = multiprocessing.get_context("spawn")
    results, everyone_tried = context.Queue(), context.Event()
    start_at = time.time() + 3
    procs = [context.Process(target=_race, args=(str(tmp_path), start_at, results, everyone_tried)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    everyone_tried.set()
    for p in procs:
        p.join(timeout=30)
    assert [o[0] for o in outcomes].count("won") == 1
    winner = next(o[1] for o in outcomes if o[0] == "won")
    assert all(f"pid {winner}" in o[1] for o in outcomes if o[0] == "lost")


def test_stale_leases_are_taken_over_and_live_ones_are_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    me = machine_identity()
    cases = [
        ({**me, "pid": dead.pid, "heartbeat": now}, True),  # dead pid on this host, same boot and pid namespace
        ({"host": "elsewhere", "pid": 1, "heartbeat": now - 120}, True),  # old heartbeat from another host
        ({"host": "elsewhere", "pid": 1, "heartbeat": now}, False),  # another host, alive
        ({**me, "pid": os.getppid(), "heartbeat": now - 30}, False),  # live pid here
        # the same host name in another container (other pid namespace): its pid means nothing here, so a pid
        # that is dead *here* is no evidence; only its heartbeat counts, and it is fresh
        ({**me, "pid_ns": "pid:[1]", "pid": dead.pid, "heartbeat": now}, False),
        ({**me, "boot_id": "another-boot", "pid": dead.pid, "heartbeat": now}, False),
    ]
    for generation, (record, stale) in enumerate(cases):
        for old in tmp_path.glob(f"{LEASE_FILE}.*"):
            old.unlink()
        path = tmp_path / f"{LEASE_FILE}.{generation}"
        path.write_text(json.dumps(record))
        lease = RunLease(tmp_path, timeout_s=60)
        if stale:
            lease.acquire()
            assert lease.generation == generation + 1  # it replaced exactly the lease it judged
            assert holder(tmp_path)["pid"] == os.getpid() and not path.exists()
            lease.release()
            assert holder(tmp_path) is None
        else:
            with pytest.raises(RunFolderError, match=f"pid {record['pid']}"):
                lease.acquire()
            assert json.loads(path.read_text()) == record


def _race_stale(run_dir: str, start_at: float, results) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    lease = RunLease(Path(run_dir), timeout_s=60)
    try:
        lease.acquire()
        time.sleep(0.3)  # hold it while the other racer is still trying
        results.put(("won", os.getpid(), lease.owned()))
        lease.release()
    except RunFolderError as err:
        results.put(("lost", os.getpid(), str(err)))


def test_two_drivers_racing_for_a_stale_lease_exactly_one_proceeds(tmp_path):
    # forkserver: the racers fork from a fresh single-threaded server, not from this process, whose threads (an
    # in-process Ray's, from earlier tests) can hold a lock at fork time and hang a forked child.
    context = multiprocessing.get_context("forkserver")
    for round_ in range(20):
        folder = tmp_path / f"r{round_}"
        folder.mkdir()
        stale = {"host": "gone", "pid": 1, "token": "old", "heartbeat": time.time() - 3600}
        (folder / f"{LEASE_FILE}.{round_}").write_text(json.dumps(stale))
        results = context.Queue()
        start_at = time.time() + 0.2
        procs = [context.Process(target=_race_stale, args=(str(folder), start_at, results)) for _ in range(2)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        assert [o[0] for o in outcomes].count("won") == 1, (round_, outcomes)
        winner = next(o for o in outcomes if o[0] == "won")
        assert winner[2], "the winner must still hold its lease while the loser tries"
        loser = next(o for o in outcomes if o[0] == "lost")
        assert f"pid {winner[1]}" in loser[2]


STALLED_DRIVER = """
import sys, time
from configs.schema import load_config
from runfolder.state import LeaseLostError
from runfolder.run import Run
config = load_config(sys.argv[1], [f"run.dir={sys.argv[2]}", "tracking.mode=disabled", "run.lease_timeout_s=2"])
run = Run(config)
print("holding", flush=True)
try:
    for i in range(100000):
        run.metric("stalled_driver_tick", i)
        time.sleep(0.05)
except (LeaseLostError, KeyboardInterrupt):
    print("LOST:", run.lease.lost, flush=True)
    run.close()
    sys.exit(3)
"""


def test_a_driver_stopped_past_the_lease_timeout_writes_nothing_more_and_exits(tmp_path):
    import signal

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-c", STALLED_DRIVER, str(ROOT / "configs/spin-tiny.yaml"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "holding"
        time.sleep(0.5)
        first.send_signal(signal.SIGSTOP)
        time.sleep(3)  # past run.lease_timeout_s=2: its heartbeat is stale now
        second = Run(config(tmp_path, "run.lease_timeout_s=2"))
        state = tmp_path / "spin/tiny/state.json"
        ticks = json.loads(state.read_text())["metrics"]["stalled_driver_tick"]
        second.metric("successor", 1)
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=30)
        assert first.returncode == 3, (out, err)
        assert f"pid {os.getpid()}" in out  # it names the new holder
        after = json.loads(state.read_text())
        assert after["metrics"]["stalled_driver_tick"] == ticks and after["metrics"]["successor"] == 1
        assert not (tmp_path / "spin/tiny/summary.json").exists()  # the fenced driver wrote no summary either
        second.close()
    finally:
        if first.poll() is None:
            first.kill()


def test_resume_after_a_config_change_stops_and_names_the_keys(tmp_path):
    Run(config(tmp_path)).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    changed = subprocess.run(
        driver(tmp_path, "training.lr=0.01", "spin.beta=[0.2]", "pools.generator.replicas=2"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert changed.returncode == 3
    assert "training.lr: 0.001 -> 0.01" in changed.stderr and "spin.beta: [0.1, 0.5] -> [0.2]" in changed.stderr
    assert "pools.generator" not in changed.stderr  # placement is not a change of what the run computes
    assert "run.fresh=true" in changed.stderr
    # Run-control keys may change between sessions; run.fresh=true starts over under the new config.
    Run(config(tmp_path, "pools.generator.replicas=2", "run.max_failed_fraction=0.5")).close()
    run = Run(config(tmp_path, "training.lr=0.01", "run.fresh=true"))
    run.close()
    state = json.loads((tmp_path / "spin/tiny/state.json").read_text())
    assert state["config"]["training.lr"] == 0.01 and state["sessions"] == 1


def test_corrupt_state_names_the_file_and_the_way_out(tmp_path):
    run = Run(config(tmp_path))
    run.metric("x", 1)
    run.close()
    state = tmp_path / "spin/tiny/state.json"
    state.write_text(state.read_text()[:25])  # a torn write
    with pytest.raises(RunFolderError) as err:
        Run(config(tmp_path))
    message = str(err.value)
    assert str(state) in message and "state.json.bak" in message and "run.fresh=true" in message
    assert holder(tmp_path / "spin/tiny") is None  # the refused driver released its lease
    (tmp_path / "spin/tiny/state.json.bak").replace(state)  # the documented recovery works
    Run(config(tmp_path)).close()


def test_run_id_cannot_escape_the_method_folder(tmp_path):
    from configs.schema import ConfigError

    for bad in ("..", ".", "a/b", "../spin"):
        with pytest.raises(ConfigError, match="run.id"):
            config(tmp_path, f"run.id={bad}", "run.fresh=true")
    (tmp_path / "spin").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "spin" / "link")
    with pytest.raises(RunFolderError, match="refusing to delete"):
        check_inside(tmp_path / "spin" / "link", tmp_path / "spin")
    check_inside(tmp_path / "spin" / "ok", tmp_path / "spin")
    keep = tmp_path / "spin" / "other-run" / "state.json"
    keep.parent.mkdir()
    keep.write_text("{}")
    Run(config(tmp_path, "run.id=fresh-one", "run.fresh=true")).close()
    assert keep.exists() and (tmp_path / "elsewhere").exists()


def _rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "x": i} for i in range(n)]


def test_parts_from_other_inputs_are_not_mixed_in(tmp_path):
    run = Run(config(tmp_path))

    def interrupted(todo):
        yield [{"id": r["id"], "y": r["x"]} for r in todo[:3]]
        raise KeyboardInterrupt  # the driver dies after one batch

    with pytest.raises(KeyboardInterrupt):
        run.row_phase("gen", _rows(6), interrupted)
    seen: list[str] = []

    def rest(todo):
        seen.extend(r["id"] for r in todo)
        yield [{"id": r["id"], "y": r["x"]} for r in todo]

    current = [r for r in _rows(6) if r["id"] != "r1"] + [{"id": "new", "x": 9}]  # the inputs changed
    out = run.row_phase("gen", current, rest)
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in current)  # r1's row is not mixed in
    assert seen == ["r3", "r4", "r5", "new"]  # r0 and r2 were kept from the part
    # A finished phase whose inputs change runs again (the new inputs only).
    seen.clear()
    assert len(run.row_phase("gen", _rows(2), rest)) == 2 and seen == ["r0", "r1"]
    run.close()


def test_failed_rows_over_the_limit_fail_the_phase_and_the_rerun_retries_exactly_them(tmp_path):
    attempts: list[list[str]] = []

    def flaky(broken: set[str], failed: list[dict]):
        def process(todo):
            attempts.append([r["id"] for r in todo])
            failed.extend({"id": r["id"], "reason": "replica gone"} for r in todo if r["id"] in broken)
            yield [{"id": r["id"]} for r in todo if r["id"] not in broken]

        return process

    run = Run(config(tmp_path, "run.max_failed_fraction=0.1"))
    failed: list[dict] = []
    with pytest.raises(PhaseFailedError, match=r"phase gen: 2 of 10 rows failed.*run.max_failed_fraction=0.1"):
        run.row_phase("gen", _rows(10), flaky({"r3", "r7"}, failed), failed=failed)
    assert not run.done("gen")
    failures = pq.read_table(tmp_path / "spin/tiny/phases/gen.failed.parquet").to_pylist()
    assert [(f["id"], f["reason"]) for f in failures] == [("r3", "replica gone"), ("r7", "replica gone")]
    run.close(error=RuntimeError("boom"))
    summary = json.loads((tmp_path / "spin/tiny/summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_rows"] == {"gen": 2}

    run = Run(config(tmp_path, "run.max_failed_fraction=0.1"))  # the next driver session
    failed = []
    out = run.row_phase("gen", _rows(10), flaky(set(), failed), failed=failed)
    assert attempts[-1] == ["r3", "r7"] and len(out) == 10 and run.done("gen")
    assert not (tmp_path / "spin/tiny/phases/gen.failed.parquet").exists()
    # One row of ten fails: within the limit, the phase is done and the row stays counted in later sessions.
    failed = []
    run.row_phase("other", _rows(10), flaky({"r5"}, failed), failed=failed)
    run.close()
    run = Run(config(tmp_path, "run.max_failed_fraction=0.1"))
    run.close()
    summary = json.loads((tmp_path / "spin/tiny/summary.json").read_text())
    assert summary["status"] == "finished" and summary["failed_rows"] == {"other": 1}
    assert json.loads((tmp_path / "spin/tiny/state.json").read_text())["phases"]["other"]["result"] == {
        "rows_in": 10,
        "rows_out": 9,
        "failed": 1,
    }


def test_a_driver_overtaken_while_it_writes_a_part_renames_nothing(tmp_path, monkeypatch):
    """The pause lands after the lease check before a part's write and before its rename: the part never appears,
    and its temp file goes too (the successor would otherwise find this driver's rows in its folder)."""
    import runfolder.run as run_module
    from runfolder.state import LeaseLostError

    run = Run(config(tmp_path))
    overtaken: list[bool] = []
    real_check, real_write = run.lease.check, run_module.pq.write_table

    def check() -> None:
        if overtaken:
            raise LeaseLostError("another driver holds the folder now")
        real_check()

    def write_then_paused(*args, **kwargs):
        real_write(*args, **kwargs)
        overtaken.append(True)  # a successor took the folder over while this file was being written

    monkeypatch.setattr(run.lease, "check", check)
    monkeypatch.setattr(run_module.pq, "write_table", write_then_paused)
    with pytest.raises(LeaseLostError):
        run.row_phase("gen", _rows(3), lambda todo: iter([[{"id": r["id"], "y": r["x"]} for r in todo]]))
    folder = tmp_path / "spin" / "tiny" / "phases"
    written = [p.name for p in folder.rglob("*") if p.is_file() and p.name != ".phase-key"]  # the key: before
    assert overtaken and not written, written
