"""Recovery on the three reference cells: this tool's SAE, SAELens's SAE, and classical sparse coding.

    python bench/bench_baselines.py            # 3 cells x 10 seeds, about 8 minutes on 2 cores
    python bench/bench_baselines.py --seeds 2  # about 1.5 minutes

Cells (p, N) = (0.1, 1000), (0.2, 1000), (0.3, 3000) with d = 10, K = 20, m = 40, the same data for every
method. Scored with the tool's recovery rate (|cos| > 0.9).

- SAE (this tool): the default recipe, trained by `train_population`.
- SAELens: `StandardTrainingSAE` with its `SAETrainer` on the same minibatches (optional import).
- scikit-learn `DictionaryLearning` (optional import): the classical sparse-coding baseline. It alternates
  an exact lasso for every sample's code with a dictionary update, with 40 atoms and non-negative codes.
  Its objective 0.5 ||x - D u||^2 + alpha |u|_1 over unit-norm atoms matches the SAE's
  ||x - x_hat||^2 + lam |z|_1 at alpha = lam / 2.
  The SAE instead infers codes with one amortised encoder pass, and the gap between the two is the
  "amortisation gap".

Each baseline is compared with the SAE cell by cell with a paired Wilcoxon signed-rank test, since every
seed gives both methods the same data. Writes bench/baselines.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sae_phase_transition as S  # noqa: E402
from bench_trainer import recoveries, saelens_runs  # noqa: E402

CELLS = ((0.1, 1000), (0.2, 1000), (0.3, 3000))


def sparse_coding_runs(runs, cfg, max_iter: int) -> list[float] | None:
    try:
        from sklearn.decomposition import DictionaryLearning
        from sklearn.exceptions import ConvergenceWarning
    except ImportError:
        return None

    def learn(r, x):
        model = DictionaryLearning(n_components=r.m, alpha=r.lam / 2, positive_code=True, fit_algorithm="cd",
                                   transform_algorithm="lasso_cd", max_iter=max_iter,
                                   random_state=S.derive_seed(cfg.seed, "sklearn", r.key) % 2**32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # inner lasso solves stop at their tolerance
            model.fit(x.double().numpy())
        return torch.tensor(model.components_, dtype=torch.float32)
    return recoveries(runs, cfg, learn)


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value for paired samples; 1 when every pair is equal."""
    from scipy.stats import wilcoxon
    if np.allclose(a, b):
        return 1.0
    return float(wilcoxon(a, b, zero_method="zsplit").pvalue)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds per cell (default: 10)")
    ap.add_argument("--max-iter", type=int, default=200, help="DictionaryLearning iterations (default: 200)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("baselines.json")), help="JSON output path")
    args = ap.parse_args()
    cfg = S.PhaseConfig(device="cpu")
    runs = [S.Run(n=n, p=p, m=cfg.width, k=cfg.k, d=cfg.d, lam=cfg.lam, seed=s, data_seed=s)
            for p, n in CELLS for s in range(args.seeds)]

    results, times = {}, {}
    for name, fn in (("SAE (this tool)", lambda: [r["recovery"] for r in S.train_population(runs, cfg)]),
                     ("SAELens SAE", lambda: saelens_runs(runs, cfg)),
                     ("sparse coding (sklearn)", lambda: sparse_coding_runs(runs, cfg, args.max_iter))):
        t = time.perf_counter()
        rec = fn()
        if rec is None:
            print(f"{name}: not installed (optional), skipped")
            continue
        times[name] = (time.perf_counter() - t) / len(runs)
        results[name] = np.array(rec).reshape(len(CELLS), args.seeds)

    print(f"\nrecovery, mean ± sd over {args.seeds} seeds (same data for every method)")
    print(f"{'method':26s}" + "".join(f"  p={p:g}, N={n:<5d}" for p, n in CELLS) + "   time/run")
    sae = results["SAE (this tool)"]
    p_vs_sae = {name: [paired_p(sae[c], rec[c]) for c in range(len(CELLS))] for name, rec in results.items()}
    for name, rec in results.items():
        cells = "".join(f"  {m:.3f} ± {s:.3f}  " for m, s in zip(rec.mean(1), rec.std(1)))
        print(f"{name:26s}{cells}  {times[name]:7.2f} s")
        if rec is not sae:
            print(f"{'  paired p vs SAE':26s}" + "".join(f"  p = {p:<12.2g}" for p in p_vs_sae[name]))
    out = dict(cells=[dict(p=p, n=n) for p, n in CELLS], seeds=args.seeds, max_iter=args.max_iter,
               machine=S.machine(torch.device("cpu")),
               methods={name: dict(recovery_mean=rec.mean(1).tolist(), recovery_sd=rec.std(1).tolist(),
                                   recovery=rec.tolist(), seconds_per_run=times[name],
                                   wilcoxon_p_vs_sae=p_vs_sae[name])
                        for name, rec in results.items()})
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
