"""Report rendering: golden markdown, idempotency, matching to the papers' numbers, damaged inputs.

After an intended change of the rendering, regenerate the golden files with
``REPRO_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_report.py`` and review the diff.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from repro.records import ResultRecord, append_records, read_all
from repro.report import generate, main
from repro.report.papers import REFERENCE_FACTS, canonical_model, load_reference, paper_comparisons
from repro.report.tables import EVAL_ORDER, records_frame

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden_report.md")
GOLDEN_INDEX = Path(__file__).with_name("golden_report_index.md")
UPDATE = os.environ.get("REPRO_UPDATE_GOLDEN") == "1"
TINY = "vit_tiny p4 @32"

REFERENCE = "".join(line + "\n" for line in [
    "method,arch,pretrain_epochs,metric,value,source,verification,method_key,model_key,epochs_key,eval_key,metric_key",
    "MAE,ViT-B/16,1600,IN1K_finetune_top1,83.6,facebookresearch/mae README.md,official-repo-doc,"
    "mae,vit_base_patch16_224,1600,finetune,top1",
    "MAE,ViT-L/16,800,ablation_dec8x512_IN1K_linear_top1,73.5,MAE paper Table 1,unverified,"
    "mae,vit_large_patch16_224,800,linear,top1",
    "MAE,ViT-B/16,1600,ADE20K_UperNet_mIoU,48.1,MAE paper Table 5,unverified,mae,vit_base_patch16_224,1600,ade20k,mIoU",
    "DINO,ViT-B/16,1600,IN1K_finetune_top1@224,82.8,as cited in ConMIM,official-repo-figure,"
    ",vit_base_patch16_224,1600,finetune,top1",
])


def records() -> list[ResultRecord]:
    out = []
    for seed, (k1, k2, lin) in enumerate([(40.0, 30.0, 50.0), (42.0, 31.0, 54.0)]):
        for method, knn in (("micl", k1), ("mae", k2)):
            common = dict(method=method, model=TINY, dataset="toy", budget="90s", seed=seed, device="cpu",
                          recipe="tiny", config_hash=f"{method}{seed}hash", git_revision="abc123",
                          time=f"2026-01-0{seed + 1}T00:00:00")
            out.append(ResultRecord(eval="pretrain", metric="final_loss", value=0.5, steps=400, epochs=10.0,
                                    pretrain_seconds=90.0, images_per_second=500.0, device_hours=0.025, **common))
            out.append(ResultRecord(eval="knn", metric="top1", value=knn, eval_seconds=15.0, **common))
            out.append(ResultRecord(eval="linear", metric="top1", value=lin, eval_seconds=3.0, **common))
            if method == "micl" or seed == 0:  # mae fine-tuned on one seed only
                out.append(ResultRecord(eval="finetune", metric="top1", value=60.0 + seed, eval_seconds=300.0,
                                        **common))
                out.append(ResultRecord(eval="finetune", metric="top5", value=90.0 + seed, eval_seconds=300.0,
                                        **common))
    for seed in (0, 1):
        out.append(ResultRecord(method="random-init", model=TINY, dataset="toy", budget="-", seed=seed,
                                eval="knn", metric="top1", value=20.0, eval_seconds=14.0, recipe="tiny",
                                git_revision="abc123", time="2026-01-01T00:00:00"))
        # the random-init backbone fine-tuned: supervised from scratch, its own row
        out.append(ResultRecord(method="random-init", model=TINY, dataset="toy", budget="-", seed=seed,
                                eval="finetune", metric="top1", value=30.0 + 2 * seed, eval_seconds=300.0,
                                recipe="tiny", git_revision="abc123", time="2026-01-01T00:00:00"))
    # a two-stage method says how its budget was split
    mimco = dict(method="mimco", model=TINY, dataset="toy", budget="90s", seed=0, device="cuda x", world_size=2,
                 recipe="tiny", config_hash="mimco0hash", git_revision="abc123", time="2026-01-03T00:00:00")
    out.append(ResultRecord(eval="pretrain", metric="final_loss", value=1.25, steps=300, epochs=7.5,
                            pretrain_seconds=7300.0, images_per_second=400.0, device_hours=4.05,
                            note="stage 1 (MoCo v3 teacher) 30 s, stage 2 60 s", **mimco))
    out.append(ResultRecord(eval="knn", metric="top1", value=35.0, eval_seconds=15.0, **mimco))
    # a re-measurement of the same key: the latest counts
    out.append(ResultRecord(method="mae", model=TINY, dataset="toy", budget="90s", seed=1, eval="knn",
                            metric="top1", value=33.0, time="2026-01-05T00:00:00"))
    # a failed run never appears as a result
    out.append(ResultRecord(method="mae", model=TINY, dataset="toy", budget="1m", seed=0,
                            eval="pretrain", metric="final_loss", value=float("nan"), status="failed",
                            time="2026-01-05T00:00:00"))
    # what each process recorded as its command line (append_records fills the current one only where empty)
    commands = {"mimco": "python -m repro.run mimco --budget 90s --set method.stage1_fraction=0.3",
                "*": "python -m repro.run micl mae --budget 90s --seeds 0 1 --evals knn,linear,finetune"}
    return [replace(r, command=commands.get(r.method, commands["*"]),
                    versions="python 3.11.7, torch 2.14.1, timm 1.0.31") for r in out]


def write_runs(runs: Path) -> None:
    """Run directories with a metrics.jsonl for micl seed 0 (resumed: steps 20-40 logged twice) and mae seed 0."""
    for method, losses in (("micl", [2.0, 1.5, 1.2, 1.0]), ("mae", [1.0, 0.8, 0.7, 0.65])):
        d = runs / "toy" / method / f"vit_tiny-90s-s0-{method}0hash"  # repro.records.run_dir_path
        d.mkdir(parents=True)
        lines = [{"step": 20 * (i + 1), "loss": x, "lr": 1e-3, "img_per_s": 500.0, "elapsed_s": 4.5 * (i + 1)}
                 for i, x in enumerate(losses)]
        if method == "micl":
            lines = lines[:2] + [dict(lines[1], loss=9.9)] + lines[1:]  # the resumed run's line wins
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # a run with no record is not plotted
    (runs / "toy" / "mae" / "vit_tiny-90s-s7-zzz").mkdir(parents=True)
    (runs / "toy" / "mae" / "vit_tiny-90s-s7-zzz" / "metrics.jsonl").write_text('{"step": 1, "loss": 5}\n')


def setup_results(tmp_path: Path) -> tuple[Path, Path]:
    results, runs = tmp_path / "results", tmp_path / "runs"
    append_records(results / "records" / "toy.jsonl", records())
    (results / "reference.csv").write_text(REFERENCE)
    write_runs(runs)
    return results, runs


def check_golden(text: str, golden: Path) -> None:
    if UPDATE:
        golden.write_text(text)
    assert text == golden.read_text()


def test_report_golden(tmp_path):
    results, runs = setup_results(tmp_path)
    generate(results, runs)
    md = (results / "toy.md").read_text()
    assert f"| micl | {TINY} | 90s | 2 |" in md
    assert "41.00 ± 1.41" in md  # micl knn over two seeds
    assert "31.50 ± 2.12" in md  # mae knn: seed 1 re-measured as 33.0
    assert "| 60.50 ± 0.71 | 90.50 ± 0.71 |" in md  # micl finetune top1, top5
    assert "| 60.00 (n=1) | 90.00 (n=1) |" in md  # mae: one of two seeds fine-tuned
    assert "| random-init |" in md and "| 1m |" not in md
    assert "| mimco [1] |" in md and "1. mimco vit_tiny p4 @32 90s: stage 1 (MoCo v3 teacher) 30 s, stage 2 60 s" in md
    assert "finetune top1 | finetune top5" in md
    scratch = next(line for line in md.splitlines() if line.startswith("| supervised-scratch |"))
    assert "| 31.00 ± 1.41 |" in scratch and "| 20.00 ± 0.00 |" not in scratch  # fine-tune only, no kNN
    floor = next(line for line in md.splitlines() if line.startswith("| random-init |"))
    assert "31.00" not in floor and "| 20.00 ± 0.00 |" in floor
    assert "No difference is shown: this is not ImageNet-1k pre-training." in md
    assert "| 73.5 † |" in md and "| 83.6 |" in md and "DINO" not in md and "48.1" not in md
    assert "![pre-training loss](toy_loss_curves.png)" in md
    check_golden(md, GOLDEN)
    index = (results / "README.md").read_text()
    assert "Commands (as recorded, in the order they ran):" in index
    cmds = index.split("Commands (as recorded")[1].split("```")[1].strip().splitlines()
    assert cmds == ["python -m repro.run micl mae --budget 90s --seeds 0 1 --evals knn,linear,finetune",
                    "python -m repro.run mimco --budget 90s --set method.stage1_fraction=0.3"]
    assert "Package versions: `python 3.11.7, torch 2.14.1, timm 1.0.31`" in index
    assert "| mimco | vit_tiny p4 @32 | 90s | 0 | cuda x × 2 | 2.0 h | knn 15 s |" in index
    for name in ("toy.md", "toy.csv", "toy_accuracy_vs_budget.png", "toy_loss_curves.png", "reference.csv"):
        assert f"({name})" in index and (results / name).exists()
    check_golden(index, GOLDEN_INDEX)
    assert "note" in pd.read_csv(results / "toy.csv").columns


def test_report_is_idempotent_and_curves_outlive_the_runs(tmp_path):
    results, runs = setup_results(tmp_path)
    written = generate(results, runs)
    snapshot = {p: p.read_bytes() for p in written}
    assert {p.name for p in written} >= {"toy.md", "toy.csv", "toy_accuracy_vs_budget.png", "toy_loss_curves.png",
                                        "README.md", "micl-90s-s0-micl0hash.csv", "mae-90s-s0-mae0hash.csv"}
    assert not (results / "curves" / "toy" / "mae-90s-s7-zzz.csv").exists()  # no record, no curve
    curve = pd.read_csv(results / "curves" / "toy" / "micl-90s-s0-micl0hash.csv")
    assert list(curve["step"]) == [20, 40, 60, 80] and list(curve["loss"]) == [2.0, 1.5, 1.2, 1.0]
    assert list(curve.columns[:5]) == ["step", "elapsed_s", "loss", "lr", "img_per_s"]

    assert set(generate(results, runs)) == set(written)
    assert {p: p.read_bytes() for p in written} == snapshot  # running twice changes nothing, PNGs included
    shutil.rmtree(runs)
    generate(results, runs)  # the run directories are gone: the copied curves still draw the same plot
    assert {p: p.read_bytes() for p in written} == snapshot


def imagenet_records() -> list[ResultRecord]:
    def run(dataset: str, model: str, budget: str, epochs: float, values: dict[tuple[str, str], float]):
        common = dict(method="mae", model=model, dataset=dataset, budget=budget, seed=0, time="2026-01-01T00:00:00")
        out = [ResultRecord(eval="pretrain", metric="final_loss", value=0.4, epochs=epochs, steps=1, **common)]
        out += [ResultRecord(eval=e, metric=m, value=v, **common) for (e, m), v in values.items()]
        return out

    full = {("finetune", "top1"): 83.0, ("linear", "top1"): 67.0, ("ade20k", "mIoU"): 47.0, ("knn", "top1"): 30.0}
    return (run("imagenet", "vit_base_patch16_224", "1600ep", 1599.8, full)  # matches (epochs round to 1600)
            + run("imagenet", "vit_base_patch16_224", "400ep", 400.0, full)  # no paper number at 400 epochs
            + run("imagenet", "vit_base_patch16_224 d6", "1600ep", 1600.0, full)  # not the paper's architecture
            + run("cifar10", "vit_base_patch16_224", "1600ep", 1600.0, full))  # not ImageNet-1k


def test_paper_numbers_match_only_the_same_setting(tmp_path):
    results = tmp_path / "results"
    append_records(results / "records" / "imagenet.jsonl", imagenet_records())
    shutil.copy(ROOT / "results" / "reference.csv", results / "reference.csv")
    df = records_frame(read_all(results / "records")[0])
    comp = paper_comparisons(df, load_reference(results / "reference.csv"))
    assert set(comp["budget"]) == {"1600ep"} and set(comp["model"]) == {"vit_base_patch16_224"}
    got = [(r.eval, r.paper, r.difference) for r in comp.itertuples()]
    assert len(got) == 6
    assert set(got) == {("finetune", "83.6", "-0.60"), ("finetune", "83.664", "-0.66"), ("finetune", "83.57", "-0.57"),
                   ("linear", "68.0", "-1.00"), ("linear", "67.8", "-0.80"), ("ade20k", "48.1 †", "-1.10")}
    assert set(comp[comp["eval"] == "ade20k"]["verification"]) == {"unverified"}

    generate(results)
    md = (results / "imagenet.md").read_text()
    assert "| mae | vit_base_patch16_224 | 1600ep | 1600 | ade20k | mIoU | 47.00 | 48.1 † | -1.10 |" in md
    assert "† = unverified" in md
    assert (results / "imagenet_vs_papers.csv").exists()
    cifar = (results / "cifar10.md").read_text()
    assert "No difference is shown: this is not ImageNet-1k pre-training." in cifar
    assert "| 83.6 |" in cifar  # the papers' number is still there, as context
    assert not (results / "cifar10_vs_papers.csv").exists()


def test_canonical_model_drops_only_default_tokens():
    assert canonical_model("vit_base_patch16_224") == "vit_base_patch16_224"
    assert canonical_model("vit_base_patch16_224 p16 @224 d12") == "vit_base_patch16_224"
    assert canonical_model("vit_large_patch16_224 d24") == "vit_large_patch16_224"
    assert canonical_model("vit_tiny_patch16_224 p4 @32 d6") == "vit_tiny_patch16_224 p4 @32 d6"
    assert canonical_model("vit_base_patch16_224 @384") == "vit_base_patch16_224 @384"
    assert canonical_model("vit_large_patch16_224 d12") == "vit_large_patch16_224 d12"


def test_reference_csv_is_the_shared_facts_with_valid_keys():
    rows = list(csv.DictReader((ROOT / "results" / "reference.csv").open(newline="")))
    assert rows and list(rows[0])[: len(REFERENCE_FACTS)] == REFERENCE_FACTS
    for r in rows:
        assert r["method_key"] in {"", "micl", "mae", "mocov3", "conmim", "mimco", "macrl"}, r
        assert r["eval_key"].split("@")[0] in {"", *EVAL_ORDER}, r
        assert r["epochs_key"] == "" or r["epochs_key"].isdigit(), r
        assert r["model_key"] == "" or canonical_model(r["model_key"]) == r["model_key"], r
        assert bool(r["eval_key"]) == bool(r["metric_key"]), r
    assert sum(1 for r in rows if r["eval_key"]) > 50
    shared = ROOT.parent / "shared" / "reference" / "paper_results.csv"
    if not shared.exists():
        pytest.skip(f"{shared} not present")
    facts = [{k: r[k] for k in REFERENCE_FACTS} for r in rows]
    assert facts == list(csv.DictReader(shared.open(newline="")))  # a faithful copy


def test_report_survives_torn_lines(tmp_path):
    results, runs = setup_results(tmp_path)
    path = results / "records" / "toy.jsonl"
    with open(path, "a") as f:
        f.write('{"method": "mi')
    with open(runs / "toy" / "mae" / "vit_tiny-90s-s0-mae0hash" / "metrics.jsonl", "a") as f:
        f.write('{"step": 100, "lo')
    generate(results, runs)
    assert "truncated trailing line" in (results / "README.md").read_text()
    assert f"| micl | {TINY} | 90s | 2 |" in (results / "toy.md").read_text()
    curve = pd.read_csv(results / "curves" / "toy" / "mae-90s-s0-mae0hash.csv")
    assert list(curve["step"]) == [20, 40, 60, 80]


def test_main_without_runs_dir_and_without_results(tmp_path, capsys):
    results, _ = setup_results(tmp_path)
    assert main(["--results", str(results), "--runs", str(tmp_path / "absent")]) == 0
    assert (results / "toy.md").exists() and not (results / "curves").exists()
    assert main(["--results", str(tmp_path / "nope")]) == 2
    assert "no such results directory" in capsys.readouterr().err


def test_wall_clock_runs_off_budget_are_flagged_with_their_time(tmp_path):
    results = tmp_path / "results"
    recs = []
    for seed, secs in ((0, 61.0), (1, 121.6)):  # 61 s of 60 is within 5%; 121.6 s is not
        recs.append(ResultRecord(method="micl", model=TINY, dataset="toy", budget="1m", seed=seed, eval="pretrain",
                                 metric="final_loss", value=0.5, steps=100, epochs=1.0, budget_seconds=60.0,
                                 pretrain_seconds=secs, images_per_second=100.0, device_hours=0.02,
                                 time="2026-01-01T00:00:00"))
    append_records(results / "records" / "toy.jsonl", recs)
    generate(results)
    md = (results / "toy.md").read_text()
    assert "seed 1 pre-trained 121.6s of a 60s budget (+103%)" in md
    assert "seed 0 pre-trained" not in md


def test_data_bound_runs_are_flagged_with_their_wait(tmp_path):
    results = tmp_path / "results"
    recs = [ResultRecord(method="mae", model=TINY, dataset="toy", budget="100steps", seed=seed, eval="pretrain",
                         metric="final_loss", value=0.5, steps=100, epochs=1.0, pretrain_seconds=60.0,
                         images_per_second=100.0, device_hours=0.02, data_wait_share=share,
                         time="2026-01-01T00:00:00")
            for seed, share in ((0, 0.04), (1, 0.37))]  # 4% is fine; 37% of the time waiting is data-bound
    append_records(results / "records" / "toy.jsonl", recs)
    generate(results)
    md = (results / "toy.md").read_text()
    assert "seed 1 data-bound: waited for batches 37% of pre-training" in md
    assert "seed 0 data-bound" not in md


def test_a_wall_clock_row_whose_seeds_ran_on_different_devices_is_flagged(tmp_path):
    # a user's demo seed 0 on an 8-thread laptop beside the committed seeds 1, 2 of a 2-thread machine
    results = tmp_path / "results"
    recs = [ResultRecord(method="micl", model=TINY, dataset="toy", budget=budget, seed=seed, eval="pretrain",
                         metric="final_loss", value=0.5, steps=steps, epochs=1.0, pretrain_seconds=90.0,
                         budget_seconds=90.0 if budget == "90s" else None, images_per_second=100.0,
                         device_hours=0.02, device=f"cpu (x86_64, {threads} threads)", time="2026-01-01T00:00:00")
            for budget in ("90s", "400steps") for seed, threads, steps in ((0, 8, 900), (1, 2, 270), (2, 2, 275))]
    append_records(results / "records" / "toy.jsonl", recs)
    generate(results)
    md = (results / "toy.md").read_text()
    assert ("micl vit_tiny p4 @32 90s: a wall-clock budget on different devices (cpu (x86_64, 2 threads) for seeds "
            "1, 2; cpu (x86_64, 8 threads) for seed 0)") in md
    assert "400steps: a wall-clock" not in md  # a step budget trains the same steps on any device


def test_notes_and_claims_head_the_results_readme(tmp_path):
    results, _ = setup_results(tmp_path)
    (results / "NOTES.md").write_text("# What was run\n\nhand-written\n")
    (results / "claims.md").write_text("## Claims\n\ngenerated\n")
    generate(results)
    text = (results / "README.md").read_text()
    assert text.index("hand-written") < text.index("generated") < text.index("# Results")
    generate(results)  # idempotent: the notes are read, never accumulated
    assert (results / "README.md").read_text() == text


def test_records_carry_this_process_command_and_versions_and_old_ones_are_rebuilt(tmp_path):
    results = tmp_path / "results"
    old = ResultRecord(method="mae", model=TINY, dataset="toy", budget="90s", seed=0, eval="knn", metric="top1",
                       value=30.0, recipe="tiny", time="2026-01-01T00:00:00")
    (results / "records").mkdir(parents=True)
    (results / "records" / "toy.jsonl").write_text(old.to_json().replace(', "command": ""', "") + "\n")
    new = replace(old, method="micl", time="2026-01-02T00:00:00")
    append_records(results / "records" / "toy.jsonl", [new])
    recs, _ = read_all(results / "records")
    assert recs[0].command == "" and recs[1].command.split()[:3] == ["python", "-m", "pytest"]
    assert recs[1].versions.startswith("python ") and "torch " in recs[1].versions
    generate(results)
    index = (results / "README.md").read_text()
    assert recs[1].command in index
    assert "Rebuilt from records that predate recorded commands:" in index
    assert "python -m repro.run micl mae --budget 90s --data <path to toy> --recipe tiny --model vit_tiny" in index


def test_budgets_sort_by_amount_not_by_text():
    from repro.report.tables import budget_order

    specs = ["1.5e+13flop", "1.67e+12flop", "5e+12flop", "-", "90s", "2m"]
    assert sorted(specs, key=budget_order) == ["1.67e+12flop", "5e+12flop", "1.5e+13flop", "90s", "2m", "-"]
