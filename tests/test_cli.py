"""The ``bdbench`` command as users run it: bad input ends in one line and exit code 2 before any
compute; a sweep writes one record per cell and a second run trains and writes nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA, TINY, fashion_mnist_available

needs_fmnist = pytest.mark.skipif(not fashion_mnist_available(), reason=f"Fashion-MNIST IDX files not under {DATA}")


# A subprocess's limit only catches a hang: limits near a command's own run time (the smoke sweep on a busy machine,
# the perf benchmarks beside a sweep) failed on load, not on behaviour.
HANG = 2400


def bdbench(tmp_path: Path, *args: str, timeout: int = HANG) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with the data, cache, records and outputs under ``tmp_path``."""
    paths = [f"paths.data={DATA}", f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}",
             f"paths.output={tmp_path / 'outputs'}"]
    return subprocess.run([sys.executable, "-m", "bdbench.cli", *args, *paths], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["attack=badnet"], "attack=badnet: no such attack (did you mean badnets?); valid: badnets, blended, "
                            "input_aware, input_aware_file, lc, none, sig, wanet"),
        (["defense=shap"], "defense=shap: no such defense; valid: anp, ar_purification, ar_purification_code, argd, clp, fp, ft, "
                           "ft_ar_control, ft_nad_teacher, linf_pruning, nad, nc, none, shap_pruning, suspiciousness"),
        (["defense=shap_pruning", "defense.value=asr"], "defense.value='asr': invalid; valid: soft_asr, asr_minus_acc"),
        (["dataset=mnist"], "dataset=mnist: no such dataset; valid: cifar10, cifar100, cifar10_jpeg, fashion_mnist, gtsrb, synthetic, tiny_imagenet"),
        (["budget=101"], "budget=101 is larger than the defender pool"),
        (["budget=-1"], "budget=-1: clean images per class must be an integer >= 0"),
        (["attack.poison_rate=1.5"], "attack.poison_rate=1.5: invalid; valid: float > 0 and < 1"),
        (["attack.target=10"], "attack.target=10: out of range for 10 classes; valid: 0..9"),
        (["device=tpu"], "device='tpu'; valid: auto, cpu, cuda"),
        (["attack.corner=middle"], "attack.corner='middle': invalid; valid: bottom_right, bottom_left, top_right, top_left"),
        (["attack=input_aware", "attack.lr_schedule_G=linear"], "attack.lr_schedule_G='linear': invalid; valid: multistep, cosine"),
        pytest.param(["-m", "budget=1,500"], "budget=500 is larger than the defender pool",  # a later job of a sweep
                     marks=needs_fmnist),  # job 1 is checked against the data files first
        (["defense=ft", "defense.schedule.lr=abc"], "defense.schedule.lr='abc': invalid; valid: float > 0 (as Schedule declares it)"),
        (["attack=badnets", "attack.size=40"], "attack.size=40 with attack.margin=0 does not fit 28x28 images; valid: size + margin <= 28"),
        (["recipe.epochs=0"], "recipe.epochs=0: invalid; valid: int >= 1 (as Recipe declares it)"),
        (["defense=ft", "defense.lr=0.1"], "defense.lr: no such key; valid: defense.augment, defense.display_name, defense.schedule"),
        (["dataset=cifar10_jpeg", "paths.data=/nonexistent"], "no train/test folder under /nonexistent/cifar10-jpeg"),
        (["defense=ft", "+defense.leak=${attack}"], "defense.leak=${attack}: a defense may not interpolate that"),
        (["seed=true"], "seed=True: must be an integer >= 0"),
        (["stage=train"], "stage='train': invalid; valid: cell, model"),
        (["reprot", "results"], "no command 'reprot'; did you mean 'report'? commands: list, gallery, perf, report, "
                                "reproduction, or key=value overrides"),  # before, Hydra's "Error parsing override"
        # a defense's config reaches only what a defender has (it resolved ${attack} into a working attack object)
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    result = bdbench(tmp_path, *args) if "paths.data=/nonexistent" not in args else subprocess.run(
        [sys.executable, "-m", "bdbench.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdbench: error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "records").exists() and not (tmp_path / "cache").exists()  # nothing computed


def test_unusable_paths_are_refused_before_any_compute(tmp_path):
    """paths.records that cannot be written was found only after the whole cell ran; a cache that is a file
    crashed. (/sys refuses new files to every user, root included.)"""
    (tmp_path / "a_file").write_text("x")
    for args, message in (([f"paths.cache={tmp_path / 'a_file'}"], "is a file, not a folder"),
                          ([f"paths.records={tmp_path / 'a_file' / 'records'}"], "is a file, not a folder"),
                          (["paths.records=/sys/bdbench-records"], "cannot write under /sys"),
                          (["-m", f"paths.output={tmp_path / 'a_file'}"], "is a file, not a folder")):  # a traceback
        output = [] if any(a.startswith("paths.output=") for a in args) else [f"paths.output={tmp_path / 'out'}"]
        result = subprocess.run([sys.executable, "-m", "bdbench.cli", *args, f"paths.data={DATA}", *output],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "records").exists()


def test_cuda_asked_for_but_absent(tmp_path):
    """No GPU visible (on a GPU machine too: CUDA_VISIBLE_DEVICES hides them, where the test used to skip)."""
    result = subprocess.run([sys.executable, "-m", "bdbench.cli", "device=cuda", f"paths.data={DATA}",
                             f"paths.cache={tmp_path / 'cache'}", f"paths.records={tmp_path / 'records'}"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2 and "device=cuda but CUDA is not available" in result.stderr


def test_missing_fashion_mnist_says_where_to_put_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bdbench.cli", f"paths.data={tmp_path}/nowhere",
                             "dataset.download=false"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "Fashion-MNIST not found under paths.data=" in result.stderr and "fashion-mnist" in result.stderr


@needs_fmnist
def test_smoke_sweep_writes_5_records_and_resumes_without_work(tmp_path):
    """9 jobs, 5 cells: the data-free rows (none, CLP) run once per poisoned model, not once per budget."""
    grid = ["-m", "experiment=smoke", "attack=badnets", "defense=none,ft,clp", "budget=0,1,10"]
    first = bdbench(tmp_path, *grid)
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted((tmp_path / "records").glob("*.json"))
    assert len(files) == 5
    records = [json.loads(f.read_text()) for f in files]
    assert {(r["cell"]["defense"], r["cell"]["budget"]) for r in records} == {
        (d, k) for d, ks in (("none", ["any"]), ("ft", [0, 1, 10]), ("clp", ["any"])) for k in ks}
    assert sum(not r["cache"]["hit"] for r in records) == 1  # one poisoned model, trained once
    sources = {(r["cell"]["defense"], r["cell"]["budget"]): r["data_source"] for r in records}
    assert sources[("ft", 0)] == "synthetic" and sources[("clp", "any")] == "none" and sources[("ft", 10)] == "real"
    # The backdoor took, and FT with 10 clean images per class lowers it.
    bd = {(r["cell"]["defense"], r["cell"]["budget"]): r for r in records}
    assert bd[("none", "any")]["metrics"]["asr"] > 0.8
    assert bd[("ft", 10)]["metrics"]["asr"] < bd[("none", "any")]["metrics"]["asr"]
    assert "Launching 5 jobs" in first.stdout + first.stderr  # 9 jobs, 5 launched
    launched = re.findall(r"#\d+ : .*defense=(\w+)", first.stdout + first.stderr)
    assert launched == ["none", "ft", "ft", "ft", "clp"]  # defense-major: one worker start per row, not per cell

    mtimes = {f: f.stat().st_mtime_ns for f in files}
    second = bdbench(tmp_path, *grid)
    log = second.stdout + second.stderr  # Hydra logs to the console (stdout)
    # Every job has a record: none is launched (before, Hydra composed each twice more and the runner skipped it)
    assert second.returncode == 0 and ("5 of 5 cells have a record; 4 jobs repeat an earlier job's cell (a "
                                       "data-free defense at another budget): not launched") in log
    assert "record exists, skipping" not in log and "Launching 0 jobs" in log
    counts = {s: sum(r.get("outcome") == s for r in records) for s in ("ok", "damaged", "collapsed")}
    assert (f"bdbench: 5 cells: 5 ran to the end ({counts['ok']} finished, {counts['damaged']} damaged, "
            f"{counts['collapsed']} collapsed, 0 no backdoor, 0 diverged), 0 failed, 0 missing") in second.stdout
    assert "cell 2 of 5 (0 skipped, 0 failed so far, ETA" in first.stdout + first.stderr
    assert "cache miss" not in log and "cache miss" in first.stdout + first.stderr
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    # Hydra's files: before, every call (even one that only skipped) added a run folder with logs and configs
    # per job; now a sweep leaves one multirun.yaml under paths.output, and a single cell nothing
    runs = sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").rglob("*") if p.is_file())
    assert len(runs) == 2 and all(p.name == "multirun.yaml" for p in runs), runs
    one = bdbench(tmp_path, "experiment=smoke", "defense=clp", "budget=1")
    assert one.returncode == 0 and "record exists, skipping" in one.stdout
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "outputs").rglob("*") if p.is_file()) == runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "outputs", "records"]


def test_perf_coalitions_writes_its_tables(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "coalitions", f"out={tmp_path}", "carriers=[4]",
                          "passes=[16]", "n_coalitions=8", "repeats=1", "device=cpu"],
                         capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "coalitions-cpu.csv")
    assert list(df["mode"]) == ["sequential", "batched"] and df["speedup"].iloc[0] == 1.0
    assert df["images_per_pass"].tolist() == [4, 16] and (df["coalitions_per_s"] > 0).all()
    assert "Fastest pass size" in (tmp_path / "coalitions-cpu.md").read_text()


def test_perf_walks_times_full_and_resumed_passes_and_cells_both_ways(tmp_path):
    """A cell run both ways must report the same defense decisions: the resumed passes are exact."""
    cell = ",".join(f"'{o}'" for o in [*TINY, "attack=badnets", "defense=fp", "budget=10", "seed=0",
                                       f"paths.cache={tmp_path / 'cache'}"])
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "walks", f"out={tmp_path}", "carriers=[4]",
                          "models=[wrn16_1]", "n_walks=2", "steps=5", "repeats=1", "device=cpu", f"cells=[[{cell}]]"],
                         capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "walks-cpu.csv")
    assert df[["model", "channels", "carriers", "coalitions"]].values.tolist() == [["wrn16_1", 560, 4, 10]]
    assert (df[["full_ms", "resumed_ms", "speedup"]] > 0).all(axis=None)
    table = (tmp_path / "walks-cpu.md").read_text()
    assert "defense=fp budget=10 seed=0 |" in table and table.count("| True |") == 1


def test_perf_pipeline_times_engine_and_reference(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "pipeline", f"out={tmp_path}",
                          "overrides=[dataset=synthetic,model=fmnist_cnn,attack=badnets]", "train_images=512",
                          "workers=[0]", "repeats=1", "device=cpu"], capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "pipeline-synthetic-cpu.csv")
    assert sorted(zip(df["phase"], df["pipeline"])) == [("eval", "DataLoader + PIL"), ("eval", "engine"),
                                                       ("train", "DataLoader + PIL"), ("train", "engine")]
    assert (df["images"] == df["phase"].map({"train": 512, "eval": 500})).all()  # 512 of the 2,000; all 500 test
    assert (df.loc[df["pipeline"] == "engine", "speedup"] == 1.0).all() and (df["seconds"] > 0).all()
    assert "faster per training epoch" in (tmp_path / "pipeline-synthetic-cpu.md").read_text()


def test_perf_datapath_divides_engine_by_the_models_own_time(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "datapath", f"out={tmp_path}", "repeats=1",
                          "cases=[{overrides: [dataset=synthetic, model=fmnist_cnn, attack=badnets], train_images: 300}]",
                          "device=cpu"], capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "datapath-cpu.csv")
    assert df["phase"].tolist() == ["train", "eval"]
    assert df["images"].tolist() == [256, 500]  # 2 full batches of 128 (drop_last) of the 300; all 500 test images
    assert (df["engine_s"] > 0).all() and (df["model_s"] > 0).all()
    assert ((df["ratio"] - df["engine_s"] / df["model_s"]).abs() < 0.01 * df["ratio"] + 1e-3).all()
    assert "the goal is <= 1.10" in (tmp_path / "datapath-cpu.md").read_text()


def test_perf_costs_divides_each_defenses_median_by_the_models_own_epoch(tmp_path):
    """Two FT cells at k = 10 timed on this CPU (10 and 30 s: median 20), one on another CPU and a failed one left
    out; the epoch the table divides by is the one its page states, the test passes each cell's own."""
    import pandas as pd

    from bdbench.records import cpu_name

    records = tmp_path / "records"
    records.mkdir()
    for i, (cpu, status, seconds) in enumerate([(cpu_name(), "ok", 10.0), (cpu_name(), "ok", 30.0),
                                                ("Another CPU", "ok", 500.0), (cpu_name(), "failed", 900.0)]):
        (records / f"{i}.json").write_text(json.dumps({
            "status": status, "env": {"device": {"cpu": cpu, "threads": 1, "type": "cpu"}},
            "display": {"defense": "FT"}, "cell": {"budget": 10},
            "timings": {"data": 1.0, "reversal": 30.0 * (i == 0), "defense": seconds, "eval": 2.0, "total": 99.0}}))
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "costs", f"out={tmp_path}", "repeats=1",
                          f"cases=[{{overrides: [dataset=synthetic, model=fmnist_cnn], records: {records}, steps: 2}}]"],
                         capture_output=True, text=True, timeout=HANG, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    row = pd.read_csv(tmp_path / "costs-cpu.csv").iloc[0]
    assert (row["defense"], row["budget"], row["cells"], row["median_s"]) == ("FT", 10, 2, 20.0)
    assert (row["total_min"], row["inputs_min"]) == (0.667, 0.5)  # (10 + 30) / 60; the first cell's reversal
    assert row["eval_passes"] == 10.0  # each cell's defense over its own 2 s evaluation: 5 and 15
    page = (tmp_path / "costs-cpu.md").read_text()
    epoch = float(re.search(r"one epoch of the model's own training = \*\*([0-9.]+) s", page).group(1))
    assert row["epochs"] == pytest.approx(20.0 / epoch, rel=0.01)  # both rounded to the digits shown
    assert "2 finished cells timed on this CPU, 1 elsewhere" in page


def test_perf_allocator_compares_fresh_processes_with_and_without_retained_memory(tmp_path):
    """Timings are not asserted (benchmarks report them); the mechanism is: at batch 512 an activation of the Fashion-
    MNIST CNN (51 MB) is above glibc's mmap threshold, so the default process faults its pages in on every step."""
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "allocator", f"out={tmp_path}", "repeats=1",
                          "images=8192", "cases=[{model: fmnist_cnn, dataset: fashion_mnist, batch: 512}]"],
                         capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    row = pd.read_csv(tmp_path / "allocator-cpu.csv").iloc[0]
    assert (row["model"], row["batch"], row["images"]) == ("fmnist_cnn", 512, 8192)
    assert row["default_faults"] > 4 * max(row["retain_faults"], 1000)  # 16 steps: ~160,000 against 5,000-13,000
    assert abs(row["speed-up"] - row["default_s"] / row["retain_s"]) < 0.01 * row["speed-up"]


def test_perf_tta_stops_each_pipeline_at_the_target_or_the_epoch_cap(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "tta", f"out={tmp_path}", "device=cpu",
                          "overrides=[dataset=synthetic,model=fmnist_cnn,attack=badnets]", "engine_recipe=reference",
                          "targets=[0.5,0.3]", "max_epochs=4", "workers=0", "train_images=1000"],
                         capture_output=True, text=True, timeout=HANG)
    assert run.returncode == 0, run.stderr[-2000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "tta-synthetic-cpu.csv")
    for pipeline, group in df.groupby("pipeline"):
        assert group["epoch"].tolist() == list(range(1, len(group) + 1)) and group["seconds"].is_monotonic_increasing
        reached = group["test_acc"] >= 0.5  # the last row is the first to reach the highest target, or epoch 4
        assert not reached.iloc[:-1].any() and (reached.iloc[-1] or len(group) == 4), pipeline
    text = (tmp_path / "tta-synthetic-cpu.md").read_text()
    assert "Time to 30 %" in text and "Time to 50 %" in text and "![" in text
    assert (tmp_path / "tta-synthetic-cpu.png").stat().st_size > 0


def test_perf_unknown_benchmark_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bdbench.cli", "perf", "strolls"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == (
        "bdbench: error: usage: bdbench perf NAME [key=value ...]; valid names: allocator, coalitions, costs, datapath, "
        "pipeline, tta, walks")


def test_report_and_version_explain_themselves(tmp_path):
    """`report --help` said 'no finished records under --help'; an override-looking argument became a folder
    literally named 'paths.data=...'; --version printed Hydra's."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "bdbench.cli", *a], cwd=tmp_path, capture_output=True,
                                    text=True, timeout=600)
    helped = run("report", "--help")
    assert helped.returncode == 0 and "--out" in helped.stdout and "--cache" in helped.stdout
    refused = run("report", "records", "paths.data=../shared/data")
    assert refused.returncode == 2 and "report takes no overrides" in refused.stderr
    assert not (tmp_path / "records").exists() and not list(tmp_path.glob("paths.data*"))
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == "bdbench 0.1.0"
    top = run("--help")  # Hydra's help listed neither the subcommands nor where to find them
    assert top.returncode == 0 and all(f"bdbench {c}" in top.stdout for c in ("list", "gallery", "report", "reproduction", "perf"))
    assert "defense     anp, ar_purification" in top.stdout
    cfg = run("-m", "experiment=smoke", "--cfg", "job")  # was Hydra's ValueError traceback
    assert cfg.returncode == 2 and cfg.stderr.startswith("bdbench: error: --cfg shows one cell") and "Traceback" not in cfg.stderr
    gallery = run("gallery", "--help")  # was a lexer error: "--help" parsed as an override
    assert gallery.returncode == 0 and "usage: bdbench gallery" in gallery.stdout and "poisoned model" in gallery.stdout
    assert not (tmp_path / "outputs").exists()
    from bdbench.report import load

    assert load(str(tmp_path))[0].empty  # a string path works


@pytest.mark.parametrize("command, expected", [(["list", "--help"], "usage: bdbench list"),
                                               (["perf", "--help"], "  tta          time to a clean test accuracy")])
def test_subcommands_print_help(tmp_path, command, expected):
    """``bdbench list --help`` ended in a Hydra traceback and ``bdbench perf --help`` in an error."""
    result = subprocess.run([sys.executable, "-m", "bdbench.cli", *command], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and expected in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("line, expected, absent", [
    ("bdbench re", {"report", "reproduction", "recipe="}, {"list", "defense="}),
    ("bdbench ", {"list", "gallery", "perf", "report", "reproduction", "defense="}, set()),
    ("bdbench report re", set(), {"report", "recipe="}),  # a subcommand's arguments are not overrides
])
def test_shell_completion_offers_subcommands_beside_overrides(tmp_path, line, expected, absent):
    """Hydra's completion (``bdbench -sc install=bash``) offered only overrides, and after a subcommand it printed
    Hydra's parse error as candidates."""
    result = subprocess.run([sys.executable, "-m", "bdbench.cli", "-sc", "query=bash"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COMP_LINE": line})
    words = set(result.stdout.split())
    assert result.returncode == 0 and expected <= words and not absent & words, (result.stdout, result.stderr[-2000:])


def test_list_describes_experiments_by_purpose(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bdbench.cli", "list"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "@package" not in result.stdout
    assert re.search(r"paper_grid\s+bdbench\s+The Fashion-MNIST grid", result.stdout)


def test_records_folder_from_the_environment_like_data_and_cache(monkeypatch):
    from hydra import compose, initialize_config_dir

    from bdbench.validate import CONF_DIR

    monkeypatch.setenv("BDBENCH_RECORDS", "/somewhere/records")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        assert compose("config").paths.records == "/somewhere/records"


@pytest.mark.parametrize("args, message", [
    # each of these tracebacked, failed after compute, or ran and wrote a record
    (["dataset.pool_per_class=abc"], "dataset.pool_per_class='abc': invalid; valid: an integer >= 0"),
    (["dataset.pool_per_class=-5"], "dataset.pool_per_class=-5: invalid; valid: an integer >= 0"),
    (["dataset.num_classes=abc"], "dataset.num_classes='abc': invalid; valid: an integer >= 2"),
    (["worker.timeout=-1"], "worker.timeout=-1: invalid; valid: a number > 0 or null"),
    (["worker.memory_gb=-1"], "worker.memory_gb=-1: invalid; valid: a number > 0 or null"),
    (["attack.poison_rate=1e-9"], "attack.poison_rate=1e-09: poisons 0 of 60000 training images; valid: a rate >="),
    (["dataset.subset.test=1"], "dataset.subset.test=1: too few images for 10 classes; valid: null (all) or an"),
    (["dataset.subset.test=0"], "dataset.subset.test=0: too few images for 10 classes"),
    (["worker.isolation=jail"], "worker.isolation='jail': invalid; valid: auto, sandbox, process, none"),
    (["monitor.test_every=abc"], "monitor.test_every='abc': invalid; valid: an integer >= 1 or null"),
    (["recipe.optimizer.lr=inf"], "recipe.optimizer.lr=inf: invalid; valid: a finite number"),
    (["seed=true"], "seed=True: must be an integer >= 0"),
    (["+foo=bar"], "foo: no such setting"),
    (["attack=input_aware_file"], "attack.checkpoint, attack.generators: no value given, and the config has no "
                                  "default; valid: attack.checkpoint=VALUE attack.generators=VALUE"),  # was a traceback
    (["attack=input_aware_file", "attack.checkpoint=model.pt", "attack.generators=model.pt"],
     "attack.checkpoint=model.pt: no such file"),
    (["-m", "hydra.sweeper.params.defense=ft,clp"],  # refused by Hydra only at launch, after a bogus count
     "hydra.sweeper.params.defense=ft,clp: Hydra cannot sweep its own config; valid: defense=ft,clp"),
    (["defense=ft", "+defense.leak=${attack}"], "defense.leak=${attack}: a defense may not interpolate that; "
                                                "valid: ${dataset.defense_augment}"),
    (["defense=ft", "+defense.home=${oc.env:BDBENCH_DATA}"], "defense.home=${oc.env:BDBENCH_DATA}: a defense may"),
    (["defense=nc", "nc_reversal.steps=${attack.target}"], "nc_reversal.steps=${attack.target}: a defense may"),
])
def test_bad_settings_are_refused_by_the_validation_pass(tmp_path, monkeypatch, args, message):
    """The CLI's validation pass in this process (the one-line, exit-code-2 path is the test above's)."""
    from bdbench.cli import prevalidate
    from bdbench.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        prevalidate([*args, f"paths.data={DATA}", f"paths.cache={tmp_path / 'cache'}",
                     f"paths.records={tmp_path / 'records'}", f"paths.output={tmp_path / 'outputs'}"])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "records").exists() and not (tmp_path / "cache").exists()
