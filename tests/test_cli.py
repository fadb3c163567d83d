"""Every subcommand end to end with tiny settings, bad input, interruption, determinism and re-plotting."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import sae_phase_transition as S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "sae_phase_transition.py")
FAST = ["--quick", "--steps", "120"]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One `all --quick` run, shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("all")
    assert S.main(["all", "--quick", "--out-dir", str(out)]) == 0
    return out


def test_all_quick_writes_every_file_and_summary(study):
    for base in S.FIGURES.values():
        for ext in ("png", "csv", "json"):
            assert (study / f"{base}.{ext}").stat().st_size > 0
    assert (study / "z_distribution_comparison_hist.csv").exists()
    assert (study / "sae_width_scaling_trajectory.csv").exists()
    summary = (study / "summary.md").read_text()
    for h in ("H1 (phase)", "H2 (huber)", "H3 (width)"):
        assert re.search(rf"^\| {re.escape(h)} \|.*\| \*\*(supported|not supported|inconclusive|supported for .*)\*\* \|$",
                         summary, re.M), h
    meta = json.loads((study / "sae_phase_transition_final.json").read_text())
    assert meta["script_sha256"] == S.script_hash()
    assert meta["config"]["steps"] == 300 and meta["n_runs"] == len(meta["run_keys"])
    assert {"torch", "numpy", "scipy"} <= set(meta["versions"])
    assert not [p for p in study.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_csv_has_one_row_per_run_with_keys_and_metrics(study):
    df = pd.read_csv(study / "sae_phase_transition_final.csv")
    cfg = S.make_config(S.PhaseConfig, {"quick": True})
    assert len(df) == len(cfg.n_grid) * len(cfg.p_grid) * cfg.seeds
    assert set(S.METRICS) <= set(df.columns) and {"n", "p", "seed", "key", "status"} <= set(df.columns)
    assert df.recovery.between(0, 1).all() and (df.status == "ok").all()


@pytest.mark.parametrize("sweep", ["phase", "huber", "width"])
def test_each_subcommand_quick_via_subprocess(sweep, tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, sweep, *FAST, "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"H\d verdict: (SUPPORTED|NOT SUPPORTED|INCONCLUSIVE|SUPPORTED FOR)", proc.stdout)
    for ext in ("png", "csv", "json"):
        assert (tmp_path / f"{S.FIGURES[sweep]}.{ext}").exists()


def test_same_seed_gives_identical_csv_and_other_seed_differs(tmp_path):
    args = ["phase", *FAST, "--n-grid", "300", "--p-grid", "0.1,0.3"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert S.main([*args, "--seed", seed, "--out-dir", str(tmp_path / name)]) == 0
    read = lambda n: (tmp_path / n / "sae_phase_transition_final.csv").read_bytes()
    assert read("a") == read("b")
    assert read("a") != read("c")


BAD_INPUTS = [
    ["phase", "--p-grid", "0,0.1"], ["phase", "--p-grid", "1.5"], ["huber", "--p", "0"], ["width", "--p=-0.1"],
    ["phase", "--n-grid", "0,100"], ["phase", "--n-grid", "1.5"], ["huber", "--n", "0"], ["width", "--widths", "0,2"],
    ["phase", "--width", "0"], ["phase", "--d", "0"], ["phase", "--k", "0"], ["width", "--k-grid", "0"],
    ["phase", "--steps", "0"], ["phase", "--seeds", "0"], ["phase", "--batch-size=-1"],
    ["huber", "--deltas", "0"], ["huber", "--deltas=-0.1,0.1"], ["phase", "--lam=-1"], ["phase", "--lr", "0"],
    ["phase", "--lr=-0.1"], ["phase", "--n-grid", ""], ["phase", "--p-grid", "a,b"], ["phase", "--n-grid", ","],
    ["phase", "--threshold", "1"], ["phase", "--threshold", "0"], ["width", "--temperature=-1"],
    ["phase", "--device", "tpu"], ["all", "--steps", "-5"], ["phase", "--lr", "nan"],
]


@pytest.mark.parametrize("argv", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(argv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.png").write_bytes(b"earlier good figure")
    before = snapshot(out)
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--out-dir", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "error" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    assert S.main(["phase", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_out_dir_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert S.main(["phase", "--quick", "--out-dir", str(f)]) == 2
    assert S.main(["phase", "--quick", "--out-dir", str(f / "below")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("--out-dir" in e for e in err)
    assert f.read_text() == "x"


def test_sigint_mid_sweep_exits_130_and_keeps_earlier_files(study, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(study, out)
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, SCRIPT, "phase", "--quick", "--steps", "50000", "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(6)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "interrupted" in err
    assert snapshot(out) == before


def test_every_run_diverging_exits_nonzero_with_advice(tmp_path, capsys):
    code = S.main(["phase", "--quick", "--optimizer", "gd", "--lr", "50", "--out-dir", str(tmp_path)])
    assert code == 1
    assert "--lr" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_partly_divergent_sweep_marks_failures_and_excludes_them(tmp_path, capsys):
    args = ["phase", "--quick", "--optimizer", "gd", "--lr", "1", "--steps", "100", "--p-grid", "0.02,1",
            "--n-grid", "200", "--out-dir", str(tmp_path)]
    assert S.main(args) == 0
    df = pd.read_csv(tmp_path / "sae_phase_transition_final.csv")
    failed = df[df.status == "failed"]
    assert set(failed.p) == {1.0} and failed.recovery.isna().all() and (failed.failed_step > 0).all()
    assert (df[df.p == 0.02].status == "ok").all()
    assert "runs failed (diverged) and are excluded" in capsys.readouterr().out


def test_replot_reproduces_verdicts_without_training(study, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(study, out)
    recorded = {n: json.loads((out / f"{b}.json").read_text())["verdict"]["verdict"] for n, b in S.FIGURES.items()}
    (out / "summary.md").unlink()

    def no_training(*a, **k):
        raise AssertionError("re-plotting must not train")
    monkeypatch.setattr(S, "train_population", no_training)
    monkeypatch.setattr(S, "_train_chunk", no_training)
    assert S.main(["plot", "all", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for verdict in recorded.values():
        assert re.search(rf"H\d verdict: {re.escape(verdict.upper())}\n", printed)
    assert len(re.findall(r"^\| H\d \(", (out / "summary.md").read_text(), re.M)) == 3


def test_replot_rejects_missing_truncated_or_mismatched_files(study, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(study, out)
    csv = out / "sae_phase_transition_final.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-2]) + "\n")   # truncated
    assert S.main(["plot", "phase", "--out-dir", str(out)]) == 2
    shutil.copy(out / "z_distribution_comparison.json", out / "sae_width_scaling.json")  # another sweep's record
    assert S.main(["plot", "width", "--out-dir", str(out)]) == 2
    (out / "z_distribution_comparison_hist.csv").unlink()                 # missing
    assert S.main(["plot", "huber", "--out-dir", str(out)]) == 2
    (out / "sae_phase_transition_final.json").write_text("{not json")      # corrupt
    assert S.main(["plot", "phase", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("sae_phase_transition.py: error:") for line in err)


def test_help_documents_every_option_with_its_default():
    for sweep in ("phase", "huber", "width", "all"):
        text = subprocess.run([sys.executable, SCRIPT, sweep, "--help"], capture_output=True, text=True).stdout
        cls = S.SWEEP_CONFIGS.get(sweep, S.Config)
        for f in S.dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in text
        assert text.count("(default:") >= len(S.dataclasses.fields(cls)) - 1  # all but the --quick flag


def test_readme_commands_are_accepted_by_the_parser():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"python sae_phase_transition\.py ([^\n`#|]*)", readme)
    assert len(commands) >= 5
    parser = S.build_parser()
    for line in commands:
        if "<" not in line:  # "<command> --help" is a placeholder, not a command
            parser.parse_args(line.split())  # exits (code 2) on an unknown subcommand or option
