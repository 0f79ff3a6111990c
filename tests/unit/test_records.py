from __future__ import annotations

import multiprocessing as mp

from repro.records import ResultRecord, append_records, read_records


def rec(i: int, **kw) -> ResultRecord:
    return ResultRecord(method="micl", model="m", dataset="d", budget="1m", eval="knn", metric="top1",
                        value=float(i), seed=0, note="x" * 500, **kw)


def _writer(path: str, k: int) -> None:
    for i in range(50):
        append_records(path, [rec(k * 1000 + i)])


def test_concurrent_appends_lose_nothing(tmp_path):
    path = tmp_path / "r.jsonl"
    procs = [mp.get_context("fork").Process(target=_writer, args=(str(path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    recs, problems = read_records(path)
    assert not problems
    assert sorted(r.value for r in recs) == sorted(float(k * 1000 + i) for k in range(4) for i in range(50))


def test_truncated_trailing_line_is_reported_and_next_append_is_clean(tmp_path):
    path = tmp_path / "r.jsonl"
    append_records(path, [rec(1), rec(2)])
    with open(path, "ab") as f:
        f.write(rec(3).to_json().encode()[:40])  # power cut mid-line
    recs, problems = read_records(path)
    assert [r.value for r in recs] == [1.0, 2.0]
    assert len(problems) == 1 and "truncated" in problems[0].reason
    append_records(path, [rec(4)])
    recs, problems = read_records(path)
    assert [r.value for r in recs] == [1.0, 2.0, 4.0] and len(problems) == 1
