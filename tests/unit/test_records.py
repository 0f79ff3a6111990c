from __future__ import annotations

from repro.records import ResultRecord, append_records, read_records


def rec(i: int, **kw) -> ResultRecord:
    return ResultRecord(method="micl", model="m", dataset="d", budget="1m", eval="knn", metric="top1",
                        value=float(i), seed=0, note="x" * 500, **kw)


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
