"""Issue 28 on a real Ray cluster on this machine: two nodes of one CPU each (ray.cluster_utils.Cluster, as Ray's
own tests use it), 200 generated images in 4 WebDataset shards (8 for the node-loss test), 2 bad samples in each.

- every image exactly once in the output, with the captions of a one-machine run;
- the second node removed mid-run: the job still finishes, nothing lost or doubled;
- a driver killed mid-run: the rerun with --resume redoes only the shards without a marker.

Ray binds to this machine's own interface address; every wait has a deadline; every Ray process the module
starts is stopped by it (checked at the end). Skipped without Ray (pip install 'captioner[ray]')."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import make_shards

from captioner.cli.main import main

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD, BAD = 4, 50, 2
FAST = ("--backend", "torch", "--batch-size", "10", "--no-progress")  # 10 divides 50: the same batches as one machine
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]


def _processes(match: Callable[[str, int], bool] | None = None) -> dict[int, str]:
    """pid -> command line of this machine's processes (those `match(cmdline, ppid)` keeps)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if match is None or match(cmd, ppid):
            found[int(pid)] = cmd
    return found


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each; the test process is the driver."""
    from captioner.runtime.workers import start

    start()  # the fork server first: Ray's threads must never be in a process that forks workers later
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from ray.cluster_utils import Cluster

    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT)  # the nodes' workers import this checkout's captioner
    started = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.second = c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.startup_s = time.monotonic() - started
    session = c.head_node.session_name
    ours: dict[int, str] = {}
    try:
        yield c
    finally:
        ours.update(_processes(lambda cmd, _: session in cmd))
        ours.update(_processes(lambda cmd, ppid: cmd.startswith("ray::") and ppid in ours))
        ray.shutdown()
        c.shutdown()
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(ours) & set(_processes()):
            time.sleep(0.2)
        left = {pid: cmd[:120] for pid, cmd in _processes().items() if pid in ours}
        assert not left, f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), SHARDS, PER_SHARD, corrupt=BAD)[0].parent


def single_run(shards: Path, model: Path, out: Path, *options: str) -> dict[str, dict]:
    """A one-machine run's rows by path (plain `captioner caption`, in this process)."""
    import pyarrow.parquet as pq

    assert main(["caption", str(shards / "*.tar"), "-o", str(out), "--model", str(model), "--workers", "0", *FAST,
                 *options]) == 3
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == len(list(shards.glob("*.tar"))) * PER_SHARD
    return {r["path"]: r for r in rows}


@pytest.fixture(scope="module")
def one_machine(shards, tiny_model, tmp_path_factory) -> dict[str, dict]:
    return single_run(shards, tiny_model, tmp_path_factory.mktemp("single") / "single.parquet")


def rows_of(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(folder).to_pylist()  # every NAME.parquet; _done/ and hidden files are skipped


def check_same(rows: list[dict], single: dict[str, dict]) -> Counter:
    """Every image exactly once, with the one-machine run's caption, score and error."""
    seen = Counter(r["path"] for r in rows)
    assert not [p for p, n in seen.items() if n > 1], "duplicates"
    assert set(seen) == set(single), f"lost {len(set(single) - set(seen))}, unexpected {len(set(seen) - set(single))}"
    for r in rows:
        one = single[r["path"]]
        assert (r["caption"], r["error"], r["key"], r["json"], r["txt"]) == \
               (one["caption"], one["error"], one["key"], one["json"], one["txt"]), r["path"]
        assert (r["score"] is None) == (one["score"] is None)
        assert r["score"] is None or abs(r["score"] - one["score"]) < 1e-3
    return seen


def test_cluster_captions_every_image_once_like_one_machine(cluster, shards, one_machine, tiny_model, tmp_path, capsys):
    out = tmp_path / "captions"
    argv = ["caption", str(shards / "*.tar"), "-o", str(out), "--ray", cluster.address, "--model", str(tiny_model), *FAST]
    assert main(argv) == 3  # the bad samples are error rows, named on stderr
    err = capsys.readouterr().err
    assert err.count("not an image or unsupported format") == SHARDS * BAD and "Traceback" not in err
    assert f"{SHARDS * (PER_SHARD - BAD)} captioned (0 with a warning), {SHARDS * BAD} failed, in {SHARDS} shards" in err
    check_same(rows_of(out), one_machine)
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"{i:05d}.parquet" for i in range(SHARDS)]
    assert sorted(p.name for p in (out / "_done").iterdir()) == [f"{i:05d}.json" for i in range(SHARDS)]
    assert main(argv + ["--resume"]) == 3  # everything has its marker: nothing runs again
    assert "(4 finished before, skipped)" in capsys.readouterr().err


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """Twice the shards of `shards`: whichever node's actor starts first, the second node finds work queued after
    its first shard."""
    return make_shards(tmp_path_factory.mktemp("many"), 2 * SHARDS, PER_SHARD, corrupt=BAD)[0].parent


def test_second_node_lost_mid_run_nothing_lost_or_doubled(cluster, many_shards, tiny_model, tmp_path):
    """The second node is removed while its actor captions a shard: after the node's first marker (which names
    the actor's process), as soon as that process is busy again (it has been handed the next shard, which takes
    about a second: beam 16 up to 100 words, the tiny model never ends early). Ray restarts the actor on the head
    and the lost shard is done again there: every image once, with a one-machine run's captions."""
    from captioner import caption_shards

    slow = {"beam": 16, "max_len": 100}
    single = single_run(many_shards, tiny_model, tmp_path / "single.parquet", "--beam", "16", "--max-len", "100")
    second, out = cluster.second.node_id, tmp_path / "out"
    removed: list[float] = []

    def remove_when_second_is_busy_again() -> None:
        deadline, pid = time.monotonic() + 120, None
        while time.monotonic() < deadline and pid is None:
            for m in (out / "_done").glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    summary = json.loads(m.read_text())
                    if summary.get("node") == second:
                        pid = summary["pid"]
            time.sleep(0.02)
        while pid is not None and time.monotonic() < deadline:
            before = _cpu_seconds(pid)
            time.sleep(0.1)
            if _cpu_seconds(pid) - before > 0.05:  # captioning: one thread near 100%; an idle actor near 0
                cluster.remove_node(cluster.second)
                removed.append(time.monotonic())
                return

    watcher = threading.Thread(target=remove_when_second_is_busy_again, daemon=True)
    watcher.start()
    report = caption_shards([str(many_shards / "*.tar")], out, model=tiny_model, backend="torch", batch_size=10,
                            search=slow)
    watcher.join(timeout=150)
    cluster.second = cluster.add_node(num_cpus=1)  # for the tests after this one
    assert removed, "the second node never began a second shard"
    rows = rows_of(out)
    seen = check_same(rows, single)
    by_second = [s for s in report.shards if s["node"] == second]
    head_actors = {s["pid"] for s in report.shards if s["node"] != second}
    print(f"node lost mid-run: {len(rows)} rows, {sum(n - 1 for n in seen.values())} duplicates, "
          f"{len(set(single) - set(seen))} lost; shards finished on the second node {len(by_second)}, on the "
          f"head {len(report.shards) - len(by_second)} by {len(head_actors)} actor processes; shard seconds "
          f"{[s['seconds'] for s in report.shards]}")
    assert len(report.shards) == 2 * SHARDS and len(by_second) == 1  # the shard it held was lost, and redone
    assert sorted(p.name for p in (out / "_done").iterdir()) == [f"{i:05d}.json" for i in range(2 * SHARDS)]


def test_rerun_after_a_killed_driver_redoes_only_unfinished_shards(cluster, shards, one_machine, tiny_model, tmp_path):
    out = tmp_path / "out"
    argv = ["caption", str(shards / "*.tar"), "-o", str(out), "--ray", cluster.address, "--model", str(tiny_model),
            "--ray-concurrency", "1", *FAST]  # one actor: the shards finish one by one
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "captioner", *argv], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and not list((out / "_done").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    import ray

    deadline = time.monotonic() + 60  # Ray stops a dead driver's actors: until then a shard may still finish
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.1)
    finished = {p.stem: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json")}
    assert 1 <= len(finished) < SHARDS
    files = {p.stem: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.stem in finished}
    assert main(argv) == 2  # an earlier run's shards: --resume or --overwrite
    assert main(argv + ["--resume"]) == 3
    check_same(rows_of(out), one_machine)
    assert {p.stem: p.stat().st_mtime_ns for p in out.glob("*.parquet") if p.stem in finished} == files  # not redone
    assert {p.stem: p.stat().st_mtime_ns for p in (out / "_done").glob("*.json") if p.stem in finished} == finished
    assert len(list((out / "_done").glob("*.json"))) == SHARDS
    print(f"cluster start-up {cluster.startup_s:.1f} s; {len(finished)} of {SHARDS} shards done before the kill")


def test_a_shard_that_cannot_be_written_stops_the_job_with_one_line(cluster, shards, tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "00001.parquet").mkdir(parents=True)  # the shard's file cannot replace a folder
    argv = ["caption", str(shards / "*.tar"), "-o", str(out), "--ray", cluster.address, "--model", str(tiny_model),
            "--resume", *FAST]
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("captioner: error: the Ray job stopped: ") and "cannot write" in last, err[-3000:]
    assert "rerun with --resume" in last and "Traceback" not in err
    assert not (out / "_done" / "00001.json").exists()
