"""Records are never lost: concurrent appenders, a writer that dies mid-line, a torn tail that the report survives.

One-record appends from 4 writers (at the end); batches that are multi-record and larger than a pipe buffer; a
writer that dies holding the lock halfway through a line; ``python -m repro.report`` on a file with a torn tail.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
from dataclasses import replace
from pathlib import Path

from repro.records import ResultRecord, append_records, read_records

WRITERS, BATCHES, PER_BATCH = 4, 25, 8  # 800 records, 200 appends, each append ~8 kB (> PIPE_BUF = 4 kB)


def rec(writer: int, i: int, **kw) -> ResultRecord:
    return ResultRecord(method=f"w{writer}", model="vit_tiny", dataset="d", budget="1m", eval="knn", metric="top1",
                        value=float(i), seed=writer, note=f"{writer}:{i}:" + "x" * 1000, **kw)


def _writer(path: str, k: int) -> None:
    for b in range(BATCHES):
        append_records(Path(path), [rec(k, b * PER_BATCH + j) for j in range(PER_BATCH)])


def _dies_mid_line(path: str) -> None:
    """Takes the lock, writes half a record and dies (no unlock, no newline): a SIGKILL/power cut mid-append."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, rec(9, 0).to_json().encode()[:300])
    os._exit(1)


def expected() -> set[tuple[str, float]]:
    return {(f"w{k}", float(i)) for k in range(WRITERS) for i in range(BATCHES * PER_BATCH)}


def test_concurrent_multirecord_appends_with_a_dying_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), k)) for k in range(WRITERS)]
    killer = ctx.Process(target=_dies_mid_line, args=(str(path),))
    for i, p in enumerate(procs):
        p.start()
        if i == 1:
            killer.start()  # dies while the others are appending
    for p in [*procs, killer]:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WRITERS and killer.exitcode == 1
    recs, problems = read_records(path)
    got = [(r.method, r.value) for r in recs]
    assert len(got) == len(set(got)) == WRITERS * BATCHES * PER_BATCH and set(got) == expected()
    # every record whole, byte for byte (plus the command line and versions append_records adds)
    assert all(replace(r, command="", versions="") == rec(r.seed, int(r.value)) and r.command for r in recs)
    # the dead writer's half line stays on a line of its own and is reported, never glued to a record
    assert len(problems) == 1
    line = path.read_bytes().split(b"\n")[problems[0].line - 1]
    assert line == rec(9, 0).to_json().encode()[:300]

def test_torn_tail_is_reported_not_dropped_and_report_survives(tmp_path, capsys):
    from repro import report

    results = tmp_path / "results"
    path = results / "records" / "builtin-shapes.jsonl"
    kw = dict(model="vit_tiny", dataset="builtin-shapes", budget="6steps", seed=0, config_hash="abc", steps=6)
    append_records(path, [
        ResultRecord(method="micl", eval="pretrain", metric="final_loss", value=1.5, **kw),
        ResultRecord(method="micl", eval="knn", metric="top1", value=42.0, **kw),
    ])
    torn = ResultRecord(method="mae", eval="knn", metric="top1", value=41.0, **kw).to_json().encode()
    with open(path, "ab") as f:
        f.write(torn[: len(torn) // 2])  # power cut mid-append
    recs, problems = read_records(path)
    assert [r.value for r in recs] == [1.5, 42.0]
    assert len(problems) == 1 and problems[0].line == 3 and "truncated trailing line" in problems[0].reason

    rc = report.main(["--results", str(results), "--runs", str(tmp_path / "no-runs")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"warning: {path}:3: truncated trailing line" in err  # reported, with file and line
    table = (results / "builtin-shapes.md").read_text()
    assert "micl" in table and "42" in table  # the intact records still make the table
    assert path.read_bytes().endswith(torn[: len(torn) // 2])  # the report reads; it never rewrites records


def _one(i: int) -> ResultRecord:
    return ResultRecord(method="micl", model="m", dataset="d", budget="1m", eval="knn", metric="top1",
                        value=float(i), seed=0, note="x" * 500)


def _one_writer(path: str, k: int) -> None:
    for i in range(50):
        append_records(path, [_one(k * 1000 + i)])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    procs = [mp.get_context("fork").Process(target=_one_writer, args=(str(path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    recs, problems = read_records(path)
    assert not problems
    assert sorted(r.value for r in recs) == sorted(float(k * 1000 + i) for k in range(4) for i in range(50))
