"""Stage a commit-ready snapshot of a results directory while its experiment is still running.

"Commit a budget's rows once all its seeds are in": this keeps only the arms (method, recipe variant, budget) whose
every seed has a pre-training record and a record of every evaluation named, plus the floor rows; reports them in a
scratch copy with ``python -m repro.report``; copies the generated files back into the results directory; and stages
the filtered records in git as a blob (``git update-index --cacheinfo``), so the records file in the working tree is
never rewritten and a running queue can keep appending to it. Then ``git commit``.

    python scripts/results_snapshot.py results/cifar10-cpu --runs runs/cifar10-cpu/claim --seeds 0 1 2 \
        --evals knn linear

Hand-written files (``NOTES.md``, ``claims.toml``) are read from the results directory and staged as they are; the
snapshot fails (exit 1) when a placeholder of ``NOTES.md`` names an arm the snapshot leaves out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from repro.report.tables import UNTRAINED

HAND_WRITTEN = ("NOTES.md", "claims.toml")


def complete_lines(path: Path, seeds: list[int], evals: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The lines of one records file whose arm has every seed's pre-training and evaluation records."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]
    have: dict[tuple[str, str, str], set[tuple[int, str]]] = defaultdict(set)
    for r in recs:
        if r.get("status", "ok") == "ok":
            have[(r["method"], r.get("variant", ""), r["budget"])].add((r["seed"], r["eval"]))
    need = {(s, e) for s in seeds for e in ("pretrain", *evals)}
    complete = {k for k, v in have.items() if k[0] in UNTRAINED or need <= v}
    kept = [ln for ln, r in zip(lines, recs, strict=True)
            if (r["method"], r.get("variant", ""), r["budget"]) in complete]
    return kept, sorted(k for k in complete if k[0] not in UNTRAINED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="the results directory (inside this git checkout)")
    p.add_argument("--runs", type=Path, required=True, help="the run directories its records came from (loss curves)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--evals", nargs="+", default=["knn", "linear"])
    args = p.parse_args(argv)
    res = args.results.resolve()
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=res, check=True, capture_output=True,
                               text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        snap = Path(tmp) / res.name
        (snap / "records").mkdir(parents=True)
        staged_records = []
        for rec_file in sorted((res / "records").glob("*.jsonl")):
            kept, arms = complete_lines(rec_file, args.seeds, args.evals)
            (snap / "records" / rec_file.name).write_text("".join(ln + "\n" for ln in kept))
            staged_records.append(rec_file)
            print(f"{rec_file.name}: {len(kept)} records; complete arms: "
                  + ", ".join(f"{m}{f'[{v}]' if v else ''}@{b}" for m, v, b in arms), file=sys.stderr)
        for name in HAND_WRITTEN:
            if (res / name).exists():
                shutil.copy(res / name, snap / name)
        report = subprocess.run([sys.executable, "-m", "repro.report", "--results", str(snap), "--runs",
                                 str(args.runs.resolve())], cwd=root, capture_output=True, text=True)
        if report.returncode != 0:
            print(report.stderr.strip().splitlines()[-1] if report.stderr.strip() else "repro.report failed",
                  file=sys.stderr)
            return 1
        generated = [q for q in snap.iterdir() if q.name not in ("records", *HAND_WRITTEN)]
        for q in generated:
            dst = res / q.name
            if q.is_dir():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(q, dst)
            else:
                shutil.copy(q, dst)
        for rec_file in staged_records:
            blob = subprocess.run(["git", "hash-object", "-w", str(snap / "records" / rec_file.name)], cwd=root,
                                  check=True, capture_output=True, text=True).stdout.strip()
            subprocess.run(["git", "update-index", "--add", "--cacheinfo",
                            f"100644,{blob},{rec_file.relative_to(root)}"], cwd=root, check=True)
    subprocess.run(["git", "add", *[str((res / n).relative_to(root)) for n in HAND_WRITTEN if (res / n).exists()],
                    *[str((res / q.name).relative_to(root)) for q in generated]], cwd=root, check=True)
    print("staged; review with git diff --cached, then commit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
