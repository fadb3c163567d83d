"""Time the batched population trainer against a per-run loop and SAELens, side by side in one process.

    python bench/bench_trainer.py            # reference workload W (72 runs), about 3 minutes on 2 cores
    python bench/bench_trainer.py --quick    # a few runs, seconds

Workload W: p in {0.05, 0.1, 0.2, 0.3, 0.4, 0.5} x N in {100, 300, 1000, 3000} x 3 seeds = 72 runs,
m = 40, d = 10, K = 20, 3000 Adam steps (lr 3e-3), batch 128, L1 weighted by decoder norms (lam 0.5).

(a) per-run loop: one nn.Module SAE at a time, autograd and torch.optim.Adam, the same recipe, data and
    minibatch indices as the batched trainer, so its recoveries should match run for run.
(b) the project's batched trainer, `train_population`, setup and evaluation included.
(c) SAELens's StandardTrainingSAE trained by its SAETrainer on the same minibatches, when sae_lens is
    importable (an optional peer: install it in a separate virtualenv with --system-site-packages).

Prints per-run times, the ratios, the achieved GFLOP/s against a large matmul measured in the same run,
and the peak RSS; writes everything to bench/results.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sae_phase_transition as S  # noqa: E402


def workload(quick: bool) -> tuple[S.PhaseConfig, list[S.Run]]:
    cfg = S.PhaseConfig(p_grid=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), n_grid=(100, 300, 1000, 3000), seeds=3,
                        device="cpu")
    if quick:
        cfg = S.PhaseConfig(p_grid=(0.1, 0.3), n_grid=(300, 1000), seeds=2, steps=500, device="cpu")
    return cfg, S.phase_runs(cfg)


def batches_of(run: S.Run, cfg: S.Config):
    """The minibatch indices the batched trainer draws for this run, step by step."""
    gen = S.batch_generator(run, cfg.seed)
    for start in range(0, cfg.steps, S.STREAM_STEPS):
        yield from torch.randint(run.n, (min(S.STREAM_STEPS, cfg.steps - start), cfg.batch_size), generator=gen)


class LoopSAE(torch.nn.Module):
    """The straightforward single-run SAE: autograd, weighted L1, b_dec subtracted from the input."""

    def __init__(self, run: S.Run, cfg: S.Config):
        super().__init__()
        init = S.init_population([run], cfg, "cpu")
        self.w_enc = torch.nn.Parameter(init.w_enc[0].clone())
        self.b_enc = torch.nn.Parameter(init.b_enc[0].clone())
        self.w_dec = torch.nn.Parameter(init.w_dec[0].clone())  # (d, m), columns are decoder directions
        self.b_dec = torch.nn.Parameter(init.b_dec[0].clone())

    def loss(self, x: torch.Tensor, lam: float) -> torch.Tensor:
        z = torch.relu((x - self.b_dec) @ self.w_enc + self.b_enc)
        x_hat = z @ self.w_dec.T + self.b_dec
        return ((x_hat - x) ** 2).sum(1).mean() + lam * (z * self.w_dec.norm(dim=0)).sum(1).mean()


def recovery_of(w_dec_rows: torch.Tensor, truth_cols: torch.Tensor, cfg: S.Config) -> float:
    cos = S.cosine_matrix(w_dec_rows[None], truth_cols.T[None])
    return float(S.recovery_rate(cos, torch.tensor([truth_cols.shape[1]]), cfg.threshold))


def recoveries(runs, cfg, learn_dictionary) -> list[float]:
    """Recovery rate of each run, for a method given as learn_dictionary(run, x) -> (m, d) dictionary rows."""
    out = []
    for r in runs:
        w, x, _ = S.run_data(r, cfg.seed, cfg.n_eval)
        out.append(recovery_of(learn_dictionary(r, x), w, cfg))
    return out


def per_run_loop(runs, cfg) -> list[float]:
    def learn(r, x):
        sae = LoopSAE(r, cfg)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
        for idx in batches_of(r, cfg):
            opt.zero_grad(set_to_none=True)
            sae.loss(x[idx], r.lam).backward()
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.clip_grad)
            opt.step()
        return sae.w_dec.detach().T
    return recoveries(runs, cfg, learn)


def saelens_runs(runs, cfg) -> list[float] | None:
    try:
        from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError:
        return None

    def learn(r, x):
        torch.manual_seed(S.derive_seed(cfg.seed, "saelens", r.key))  # SAELens initialises from the global RNG
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=r.d, d_sae=r.m, l1_coefficient=r.lam,
                                                            decoder_init_norm=cfg.init_decoder_norm))
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
            lr=cfg.lr, lr_end=cfg.lr, adam_beta1=0.9, adam_beta2=0.999, device="cpu",
            logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=(x[idx] for idx in batches_of(r, cfg)),
                             save_checkpoint_fn=lambda *a, **k: None)
        with contextlib.redirect_stderr(io.StringIO()):  # SAELens's own progress bar, one per run
            trainer.fit()
        return sae.W_dec.detach()
    return recoveries(runs, cfg, learn)


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few short runs (seconds)")
    ap.add_argument("--loop-runs", type=int, default=None,
                    help="runs of W timed with the per-run loop (default: all of W; 3 with --quick)")
    ap.add_argument("--saelens-runs", type=int, default=3, help="runs of W trained with SAELens (default: 3)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results.json")), help="JSON output path")
    args = ap.parse_args()
    cfg, runs = workload(args.quick)
    loop_n = args.loop_runs or (3 if args.quick else len(runs))
    # spread the subsets over the grid rather than taking its first cells
    pick = lambda k: [runs[i] for i in np.linspace(0, len(runs) - 1, min(k, len(runs))).round().astype(int)]
    peak = matmul_gflops()
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; large-matmul peak {peak:.0f} GFLOP/s")

    t = time.perf_counter()
    batched = S.train_population(runs, cfg)
    t_batched = (time.perf_counter() - t) / len(runs)
    rss_batched = S.peak_rss_mib()
    flops = sum(5 * 2 * cfg.batch_size * r.d * r.m for r in runs) * cfg.steps  # five matmuls per step
    gflops = flops / (t_batched * len(runs)) / 1e9
    print(f"(b) batched trainer: {t_batched * 1e3:.1f} ms/run over {len(runs)} runs, {gflops:.1f} GFLOP/s "
          f"({100 * gflops / peak:.1f}% of the matmul peak), peak RSS {rss_batched:.0f} MiB")

    loop_set = pick(loop_n)
    t = time.perf_counter()
    loop_rec = per_run_loop(loop_set, cfg)
    t_loop = (time.perf_counter() - t) / len(loop_set)
    print(f"(a) per-run loop:    {t_loop * 1e3:.1f} ms/run over {len(loop_set)} runs")

    lens_set = pick(args.saelens_runs)
    t = time.perf_counter()
    lens_rec = saelens_runs(lens_set, cfg)
    t_lens = (time.perf_counter() - t) / len(lens_set) if lens_rec is not None else None
    print("(c) SAELens:         " + (f"{t_lens * 1e3:.1f} ms/run over {len(lens_set)} runs" if t_lens else
                                      "not installed (optional peer), skipped"))

    by_key = {r.key: res["recovery"] for r, res in zip(runs, batched)}
    diff = np.array([by_key[r.key] - rec for r, rec in zip(loop_set, loop_rec)])
    print(f"\nspeed-up of (b): {t_loop / t_batched:.1f}x vs the per-run loop"
          + (f", {t_lens / t_batched:.1f}x vs SAELens" if t_lens else ""))
    print(f"recovery, batched minus loop on the same {len(diff)} runs: mean {diff.mean():+.4f}, "
          f"max |diff| {np.abs(diff).max():.4f}; mean recovery batched {np.mean([by_key[r.key] for r in loop_set]):.3f},"
          f" loop {np.mean(loop_rec):.3f}")
    if lens_rec:
        print(f"recovery on the {len(lens_rec)} SAELens runs: SAELens {np.mean(lens_rec):.3f}, batched "
              f"{np.mean([by_key[r.key] for r in lens_set]):.3f}")
    result = dict(workload="quick" if args.quick else "W", runs=len(runs), steps=cfg.steps,
                  batch_size=cfg.batch_size, machine=S.machine(torch.device("cpu")), torch=torch.__version__,
                  matmul_peak_gflops=peak, batched_s_per_run=t_batched, batched_gflops=gflops,
                  batched_fraction_of_peak=gflops / peak, peak_rss_mib_after_batched=rss_batched,
                  loop_s_per_run=t_loop, loop_runs=len(loop_set), saelens_s_per_run=t_lens,
                  saelens_runs=len(lens_set) if t_lens else 0, speedup_vs_loop=t_loop / t_batched,
                  speedup_vs_saelens=(t_lens / t_batched) if t_lens else None,
                  recovery_batched_minus_loop_mean=float(diff.mean()),
                  recovery_batched_minus_loop_max_abs=float(np.abs(diff).max()),
                  recovery_saelens_mean=float(np.mean(lens_rec)) if lens_rec else None,
                  recovery_batched_mean_on_saelens_runs=float(np.mean([by_key[r.key] for r in lens_set])))
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
