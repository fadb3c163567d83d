"""Test, by numerical experiment, three claims about how ReLU sparse autoencoders learn a dictionary.

Synthetic data x = W* c has a known ground-truth dictionary W* (K random unit vectors in R^d) and sparse
non-negative codes c (|N(0,1)| magnitudes times a Bernoulli(p) mask). A population of ReLU SAEs is trained
on it as one batched tensor program, and each SAE is scored by how many true features its decoder
recovers. Three sweeps test the three hypotheses of the original research note; the note's numbers are
hypotheses to test, not targets:

    python sae_phase_transition.py phase   # H1: recovery switches sharply over samples N x sparsity p
    python sae_phase_transition.py huber   # H2: Huber smoothing (even delta=1e-3) is worse than exact L1
    python sae_phase_transition.py width   # H3: recovery saturates near m = 4d (mean-field limit)
    python sae_phase_transition.py all     # all three, plus images/summary.md with a verdict table
    python sae_phase_transition.py plot all   # redraw figures and verdicts from the saved CSV/JSON

Each sweep writes into --out-dir (default images/): a PNG, a CSV with one row per trained SAE, and a JSON
with the full config, package versions, the script's hash, the command line and the wall time. `--quick`
runs a tiny version of any sweep in seconds.

Measured with the defaults on a 2-core CPU (AMD EPYC, torch 2.13 CPU build, 2 threads): phase trains
240 SAEs in about 15 s, huber 150 in about 15 s, width 200 in about 16 s, and `all` takes about 50 s; the
README gives the ranges over repeated runs and each JSON the time of its own run. Its verdicts
(images/summary.md): H1 not supported - p <= 0.1 recovers from N = 500 and p = 0.2 improves with N, but
p = 0.4 reaches 0.55 +- 0.20 at N = 5000 (5 seeds a cell). H2 supported only for the torch.nn.HuberLoss
scaling; the Moreau-envelope Huber matches L1 at delta <= 3e-3 (10 seeds, Mann-Whitney, Holm). H3
supported for K = 20 (saturation at m = 4d = 2K) but not for K = 40, still rising at 16d (20 seeds).

The training recipe (defaults, and why)
---------------------------------------
- Loss per sample: ||x - x_hat||^2 + lam * sum_j penalty(z_j) * ||W_d[:, j]||   (lam = 0.5).
  The sparsity penalty is weighted by each latent's decoder norm, as in SAELens's standard L1 SAE and
  Anthropic's April 2024 update. Without it L1 can be defeated by shrinking z and growing W_d; the
  classical alternative re-projects decoder rows to unit norm after every step
  (`--decoder-norm project`). An ablation on this data found the weighting to be the decisive element of
  the recipe: at (p=0.2, N=1000) recovery went from 0.60 (re-projection) to 0.95 (weighted), at
  (p=0.3, N=3000) from 0.18 to 0.85. The phase boundary moves with this choice, so it is an option.
- Decoder rows start at norm 0.1 with W_e = W_d^T, b_d is subtracted from the input (SAELens defaults;
  the ablation found them worth +-0.05 at most).
- Adam (lr 3e-3), minibatches of 128 drawn with replacement from the member's own N samples, and a fixed
  number of optimisation steps (3000) whatever N is: the note's fix for its low-N instability, since a
  fixed number of epochs gives small-N runs almost no updates.
- Theory mode: `--optimizer gd` is plain gradient descent (a discretised gradient flow; with
  `--batch-size 0` every step uses all N samples, so it is gradient descent on the empirical risk) and
  `--temperature tau` adds Langevin noise sqrt(2 * lr * tau) * xi to every parameter after each step
  (mean-field Langevin dynamics).
- Penalties: L1 is |z|. Huber_delta is the Moreau envelope of |z|: z^2/(2 delta) for |z| <= delta,
  |z| - delta/2 above, so it tends to |z| as delta -> 0 with slope 1 outside [-delta, delta].
  `torch.nn.HuberLoss(delta=delta)` is delta times that function (convention "torch"): its penalty weight
  shrinks with delta, which a researcher using the library loss gets without noticing.

Metrics (per trained SAE, on a held-out sample of --n-eval points from the same distribution)
-----------------------------------------------------------------------------------------
recovery = (1/K) sum_k 1[max_j |cos(W_d[:, j], w*_k)| > threshold]  (threshold 0.9), MMCS (mean over k of
max_j |cos|), MCC (one-to-one Hungarian matching on |cos|, summed over matches and divided by K), L0
(mean active latents per sample), fraction of activations exactly zero / in (0, eps) / in (0, delta),
dead latents (never active on the held-out set), FVU (fraction of variance unexplained), and the
training objective on the held-out set.

Reproducibility: every run draws its dictionary, data, initialisation and minibatches from generators
seeded by a hash of (--seed, the run's own key), so a run gives the same numbers alone or inside any
population; tests check this. Runs of the same seed index that differ only in the penalty share their
dictionary, data, initialisation and minibatch order, so a comparison of penalties is paired by design;
runs that differ only in width share their data and minibatches.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import torch

SCRIPT_PATH = Path(__file__).resolve()
FIGURES = {  # sweep -> base name of its files in --out-dir
    "phase": "sae_phase_transition_final",
    "huber": "z_distribution_comparison",
    "width": "sae_width_scaling",
}


class UsageError(ValueError):
    """Bad user input: reported as one line on stderr with exit code 2, before any work."""


# ---------------------------------------------------------------------------------------------------
# Config. Every option and its default lives here, once; argparse is generated from these dataclasses.
# ---------------------------------------------------------------------------------------------------

def opt(default, help: str, **kw):
    """A config field whose help text becomes the --help line of its option."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class Config:
    """Options shared by every sweep: the recipe, the data shape, seeds and where results go."""
    # data
    d: int = opt(10, "input dimension d")
    n_eval: int = opt(2048, "held-out samples per run on which metrics are measured")
    # model and recipe
    width: int = opt(40, "SAE hidden width m (phase, huber); 4d = 2K by default")
    lam: float = opt(0.5, "sparsity penalty weight lambda")
    steps: int = opt(3000, "optimisation steps per run, the same for every N (the note's fix)")
    lr: float = opt(3e-3, "learning rate (Adam step size, or the gd step eta)")
    batch_size: int = opt(128, "minibatch size, drawn with replacement from the run's own N samples; 0 = full "
                          "batch (every step uses all N: gradient descent on the empirical risk)")
    optimizer: str = opt("adam", "optimiser: adam, or gd = plain gradient descent (discretised gradient flow)",
                         choices=("adam", "gd"))
    temperature: float = opt(0.0, "Langevin temperature tau: adds sqrt(2*lr*tau)*xi to the parameters each step")
    decoder_norm: str = opt("weighted", "weighted: penalty times decoder-row norms (SAELens standard); "
                            "project: re-project decoder rows to unit norm after each step",
                            choices=("weighted", "project"))
    init_decoder_norm: float = opt(0.1, "initial decoder-row norm in weighted mode (W_e = W_d^T at init)")
    clip_grad: float = opt(0.0, "clip each run's gradient to this total norm before the update (0 = off)")
    # metrics
    threshold: float = opt(0.9, "|cos| above which a true feature counts as recovered")
    eps: float = opt(1e-3, "activations in (0, eps) count as near-zero")
    # seeds, hardware, output
    seeds: int = opt(5, "independent seeds (replicates) per cell")
    seed: int = opt(0, "base seed; every run derives its own generators from (seed, run key)")
    device: str = opt("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    max_memory: float = opt(2048.0, "memory budget in MiB for one trained chunk of the population")
    out_dir: str = opt("images", "folder for the PNG, CSV and JSON files (created if missing)")
    quick: bool = opt(False, "tiny smoke-test settings (seconds); explicit options still override them")

    QUICK: ClassVar[dict] = dict(steps=300, seeds=2, n_eval=512)


@dataclass
class PhaseConfig(Config):
    """H1: recovery over sample count N x sparsity p."""
    k: int = opt(20, "number of true features K")
    n_grid: tuple = opt((100, 200, 500, 1000, 2000, 5000), "sample counts N", kind=int)
    p_grid: tuple = opt((0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5), "sparsities p (probability a feature is active)",
                        kind=float)

    QUICK: ClassVar[dict] = dict(Config.QUICK, n_grid=(200, 1000), p_grid=(0.1, 0.3, 0.5))


@dataclass
class HuberConfig(Config):
    """H2: exact L1 against Huber smoothing with shrinking delta, at fixed N and p."""
    k: int = opt(20, "number of true features K")
    n: int = opt(1000, "sample count N")
    p: float = opt(0.1, "sparsity p")
    deltas: tuple = opt((1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001), "Huber smoothing widths delta", kind=float)
    huber_convention: str = opt("both", "moreau (slope 1 above delta), torch (delta x moreau, like "
                                "torch.nn.HuberLoss) or both", choices=("moreau", "torch", "both"))
    seeds: int = opt(10, "independent seeds (replicates) per penalty")
    alpha: float = opt(0.05, "family-wise significance level (Holm-corrected)")

    QUICK: ClassVar[dict] = dict(Config.QUICK, seeds=3, deltas=(0.1, 0.001))


@dataclass
class WidthConfig(Config):
    """H3: hidden width m scaling, at fixed N and p, for several K."""
    n: int = opt(1000, "sample count N")
    p: float = opt(0.1, "sparsity p")
    widths: tuple = opt((1, 2, 4, 8, 16), "hidden widths m as multiples of d", kind=int)
    k_grid: tuple = opt((20, 40), "numbers of true features K (tells m/d apart from m/K)", kind=int)
    data_seeds: int = opt(2, "datasets per K; within each, only the seed (initialisation and minibatch "
                             "order) varies")
    seeds: int = opt(10, "seeds per (K, dataset, width)")
    checkpoints: int = opt(10, "log-spaced steps at which recovery and loss are recorded")

    QUICK: ClassVar[dict] = dict(Config.QUICK, seeds=3, data_seeds=1, widths=(1, 4), k_grid=(20,), checkpoints=4)


SWEEP_CONFIGS = {"phase": PhaseConfig, "huber": HuberConfig, "width": WidthConfig}


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device("cuda")
    return torch.device("cpu")


def validate(cfg: Config) -> None:
    """Reject bad input before any work, naming the option and the accepted range."""
    def positive_int(name, v):
        if not (isinstance(v, int) and v >= 1):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")

    for name in ("d", "n_eval", "width", "steps", "seeds"):
        positive_int(name, getattr(cfg, name))
    if not (isinstance(cfg.batch_size, int) and cfg.batch_size >= 0):
        raise UsageError(f"--batch-size must be a positive integer, or 0 for full batch, got {cfg.batch_size!r}")
    for name in ("k", "n", "data_seeds", "checkpoints"):
        if hasattr(cfg, name):
            positive_int(name, getattr(cfg, name))
    for name in ("n_grid", "widths", "k_grid"):
        for v in getattr(cfg, name, ()):
            positive_int(name, v)
    for name in ("p_grid", "deltas", "n_grid", "widths", "k_grid"):
        if hasattr(cfg, name) and len(getattr(cfg, name)) == 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be empty")
    for name in ("p_grid", "p"):
        for p in np.atleast_1d(getattr(cfg, name, ())):
            if not 0 < p <= 1:
                raise UsageError(f"--{name.replace('_', '-')}: sparsity must lie in (0, 1], got {p}")
    for delta in getattr(cfg, "deltas", ()):
        if not delta > 0:
            raise UsageError(f"--deltas must be > 0, got {delta}")
    checks = [("lam", cfg.lam >= 0, ">= 0"), ("lr", cfg.lr > 0, "> 0"), ("temperature", cfg.temperature >= 0, ">= 0"),
              ("threshold", 0 < cfg.threshold < 1, "in (0, 1)"), ("eps", cfg.eps > 0, "> 0"),
              ("init_decoder_norm", cfg.init_decoder_norm > 0, "> 0"), ("max_memory", cfg.max_memory > 0, "> 0"),
              ("clip_grad", cfg.clip_grad >= 0, ">= 0")]
    if hasattr(cfg, "alpha"):
        checks.append(("alpha", 0 < cfg.alpha < 1, "in (0, 1)"))
    for name, ok, rule in checks:
        value = getattr(cfg, name)
        if not (ok and math.isfinite(value)):
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    resolve_device(cfg.device)
    check_out_dir(Path(cfg.out_dir))


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-").close()  # deleted on close
    except OSError as e:
        raise UsageError(f"--out-dir {out} cannot be written: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------------
# Data: a known dictionary W* and sparse non-negative codes.
# ---------------------------------------------------------------------------------------------------

def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of plain values; stable across processes and platforms."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def make_dictionary(d: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """K random unit vectors in R^d, as the columns of a (d, K) matrix."""
    w = torch.randn(d, k, generator=gen)
    return w / w.norm(dim=0, keepdim=True)


def sample_codes(n: int, k: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """(n, K) codes: |N(0,1)| magnitudes times an independent Bernoulli(p) mask."""
    active = torch.rand(n, k, generator=gen) < p
    return torch.randn(n, k, generator=gen).abs() * active


@dataclass(frozen=True)
class Run:
    """One SAE to train. Its fields are its key: they fix its data, initialisation, penalty and result."""
    n: int
    p: float
    m: int
    k: int
    d: int
    lam: float
    seed: int                   # initialisation and minibatch seed index
    data_seed: int              # dictionary and data seed index
    penalty: str = "l1"         # l1 | huber
    delta: float = 0.0          # Huber width (0 for L1)
    convention: str = "moreau"  # moreau | torch (Huber only)

    @property
    def key(self) -> str:
        pen = "l1" if self.penalty == "l1" else f"huber-{self.convention}-{self.delta:g}"
        return (f"N={self.n},p={self.p:g},m={self.m},K={self.k},d={self.d},lam={self.lam:g},{pen},"
                f"data={self.data_seed},seed={self.seed}")


def batch_generator(run: Run, base_seed: int) -> torch.Generator:
    """The stream of the run's minibatch indices. It depends on the data and the seed but not on the penalty
    or width, so runs that differ only in those see the same minibatches (common random numbers)."""
    return generator(base_seed, "batches", run.d, run.k, run.p, run.n, run.data_seed, run.seed)


def run_data(run: Run, base_seed: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The run's dictionary (d, K), training set (N, d) and held-out set (n_eval, d)."""
    w = make_dictionary(run.d, run.k, generator(base_seed, "dictionary", run.d, run.k, run.data_seed))
    train = sample_codes(run.n, run.k, run.p, generator(base_seed, "train", run.d, run.k, run.p, run.n, run.data_seed))
    held = sample_codes(n_eval, run.k, run.p, generator(base_seed, "eval", run.d, run.k, run.p, run.data_seed))
    return w, train @ w.T, held @ w.T


# ---------------------------------------------------------------------------------------------------
# Model and penalties. z = ReLU(W_e^T (x - b_d) + b_e), x_hat = W_d z + b_d; column j of W_d is latent j's
# decoder direction.
# ---------------------------------------------------------------------------------------------------

def penalty(z: torch.Tensor, delta, scale=1.0) -> torch.Tensor:
    """Huber penalty as the Moreau envelope of |z|, times `scale`; delta = 0 gives exactly |z|.

    penalty(z, delta) = z^2 / (2 delta) for |z| <= delta, |z| - delta/2 above.
    >>> penalty(torch.tensor([0.0, 0.05, 0.1, 2.0]), 0.1).tolist()   # [0, 0.0125, 0.05, 1.95]
    The torch.nn.HuberLoss(delta) convention is scale = delta.
    """
    a = z.abs()
    safe = torch.where(torch.as_tensor(delta) > 0, torch.as_tensor(delta), torch.ones(()))
    return scale * torch.where(a >= delta, a - torch.as_tensor(delta) / 2, a * a / (2 * safe))


def penalty_grad(z: torch.Tensor, delta, scale=1.0) -> torch.Tensor:
    """d penalty / dz for z >= 0 (ReLU outputs): min(z / delta, 1) * scale; 1 * scale for L1 (delta = 0)."""
    safe = torch.where(torch.as_tensor(delta) > 0, torch.as_tensor(delta), torch.ones(()))
    return scale * torch.where(z >= delta, torch.ones(()), z / safe)


class Population:
    """Parameters of P SAEs of equal width, stacked along a leading population dimension.

    They live in one flat (P, n_params) buffer, and w_enc, b_enc, w_dec, b_dec are views of it, so the
    optimiser updates every parameter of every member with a handful of kernels.
    """

    def __init__(self, flat: torch.Tensor, d: int, m: int):
        self.flat, P = flat, flat.shape[0]
        w_enc, self.b_enc, w_dec, self.b_dec = flat.split([d * m, m, d * m, d], dim=1)
        self.w_enc = w_enc.view(P, d, m)   # (P, d, m)
        self.w_dec = w_dec.view(P, d, m)   # (P, d, m), column j is latent j's decoder direction
        # b_enc (P, m), b_dec (P, d)

    @staticmethod
    def from_parts(w_enc, b_enc, w_dec, b_dec) -> "Population":
        P, d, m = w_enc.shape
        return Population(torch.cat([t.reshape(P, -1) for t in (w_enc, b_enc, w_dec, b_dec)], 1), d, m)

    def tensors(self) -> list[torch.Tensor]:
        return [self.w_enc, self.b_enc, self.w_dec, self.b_dec]


@dataclass
class PenaltySpec:
    """Per-member penalty as data: lam, Huber delta (0 = L1) and scale, each shaped (P, 1, 1)."""
    lam: torch.Tensor
    delta: torch.Tensor
    scale: torch.Tensor
    all_l1: bool  # every member uses L1: the penalty gradient is the constant lam * scale

    @staticmethod
    def of(runs: Sequence[Run], device) -> "PenaltySpec":
        col = lambda vals: torch.tensor(vals, dtype=torch.float32, device=device).view(-1, 1, 1)
        deltas = [r.delta if r.penalty == "huber" else 0.0 for r in runs]
        scales = [r.delta if (r.penalty == "huber" and r.convention == "torch") else 1.0 for r in runs]
        return PenaltySpec(col([r.lam for r in runs]), col(deltas), col(scales), all(v == 0 for v in deltas))


def init_population(runs: Sequence[Run], cfg: Config, device) -> Population:
    """Decoder rows: random directions of norm init_decoder_norm (1 in project mode); W_e = W_d^T; zero biases."""
    norm = cfg.init_decoder_norm if cfg.decoder_norm == "weighted" else 1.0
    rows = []
    for r in runs:
        w = torch.randn(r.m, r.d, generator=generator(cfg.seed, "init", r.d, r.m, r.seed))
        rows.append(norm * w / w.norm(dim=1, keepdim=True))
    w_dec = torch.stack(rows).transpose(1, 2).to(device)
    P, d, m = w_dec.shape
    return Population.from_parts(w_dec, torch.zeros(P, m, device=device), w_dec, torch.zeros(P, d, device=device))


def encode(pop: Population, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations and activations z = ReLU(...), each (P, B, m), for inputs x (P, B, d)."""
    pre = torch.baddbmm(pop.b_enc.unsqueeze(1), x - pop.b_dec.unsqueeze(1), pop.w_enc)
    return pre, torch.relu(pre)


def decode(pop: Population, z: torch.Tensor) -> torch.Tensor:
    return torch.baddbmm(pop.b_dec.unsqueeze(1), z, pop.w_dec.transpose(1, 2))


def column_norms(w: torch.Tensor) -> torch.Tensor:
    """Norms of the columns of (P, d, m) matrices, (P, m). Spelled out: torch's norm over a middle
    dimension took 20x longer here."""
    return (w * w).sum(1).sqrt()


def latent_weights(pop: Population, weighted: bool) -> torch.Tensor:
    """Per-latent penalty weight (P, 1, m): decoder-column norms, or ones when columns are kept at unit norm."""
    if weighted:
        return column_norms(pop.w_dec).unsqueeze(1)
    return torch.ones_like(pop.b_enc).unsqueeze(1)


def objective(pop: Population, x: torch.Tensor, pen: PenaltySpec, weighted: bool, z=None, x_hat=None):
    """Per-member loss (P,): mean over the batch of ||x - x_hat||^2 + lam * sum_j penalty(z_j) * weight_j.

    Differentiable; the trainer uses the hand-written gradient of this function (`gradients`). Pass the
    activations z and reconstruction x_hat when they are already at hand.
    """
    if z is None:
        z = encode(pop, x)[1]
        x_hat = decode(pop, z)
    recon = (x_hat - x).pow(2).sum(2)
    sparsity = (penalty(z, pen.delta, pen.scale) * latent_weights(pop, weighted)).sum(2)
    return (recon + pen.lam.view(-1, 1) * sparsity).mean(1)


def gradients(pop: Population, x: torch.Tensor, pen: PenaltySpec, weighted: bool) -> list[torch.Tensor]:
    """Gradient of sum(objective(...)) w.r.t. (w_enc, b_enc, w_dec, b_dec), written out by hand.

    Autograd would record ~20 small kernels per step and keep their buffers; the explicit backward pass
    is shorter and measurably faster for these tiny matrices (tests check it against autograd). It works
    on transposed activations, (P, m, B) and (P, d, B): batched matmuls whose output ends in the small
    dimension d = 10 run about 4x slower on CPU than the same products laid out to end in B or m.
    """
    B = x.shape[1]
    neg_xc = pop.b_dec.unsqueeze(2) - x.transpose(1, 2)                              # -(x - b_d), (P, d, B)
    pre_t = torch.baddbmm(pop.b_enc.unsqueeze(2), pop.w_enc.transpose(1, 2), neg_xc, alpha=-1)  # (P, m, B)
    z_t = pre_t.relu_()
    g_out = torch.baddbmm(neg_xc, pop.w_dec, z_t, beta=2.0 / B, alpha=2.0 / B)     # d loss / d x_hat
    weight = latent_weights(pop, weighted).transpose(1, 2)                             # (P, m, 1)
    if pen.all_l1:  # L1: the penalty gradient is the constant lam * weight wherever z > 0
        g_z = torch.baddbmm((pen.lam / B) * weight, pop.w_dec.transpose(1, 2), g_out)
    else:
        g_z = torch.baddbmm((pen.lam / B) * weight * penalty_grad(z_t, pen.delta, pen.scale),
                            pop.w_dec.transpose(1, 2), g_out)
    g_pre = torch.ops.aten.threshold_backward.grad_input(g_z, z_t, 0, grad_input=g_z)  # ReLU backward, in place
    g_b_enc = g_pre.sum(2)
    g_w_enc = torch.bmm(neg_xc, g_pre.transpose(1, 2)).neg_()
    g_w_dec = torch.bmm(g_out, z_t.transpose(1, 2))
    if weighted:  # d/dW_d of lam * mean_b sum_j pen(z_bj) ||W_d[:, j]||
        mean_pen = z_t.mean(2) if pen.all_l1 else penalty(z_t, pen.delta, pen.scale).mean(2)
        g_w_dec += (pen.lam.view(-1, 1) * mean_pen / weight.squeeze(2)).unsqueeze(1) * pop.w_dec
    g_b_dec = g_out.sum(2) - torch.bmm(pop.w_enc, g_b_enc.unsqueeze(2)).squeeze(2)
    return [g_w_enc, g_b_enc, g_w_dec, g_b_dec]


# ---------------------------------------------------------------------------------------------------
# Training: one batched trainer for every sweep.
# ---------------------------------------------------------------------------------------------------

STREAM_STEPS = 256   # minibatch indices are drawn per member in blocks of this many steps
NOISE_STEPS = 32     # Langevin noise likewise (smaller: a block holds n_params floats per step)
CHECK_EVERY = 50     # steps between checks for non-finite parameters (one host sync each)


class Adam:
    """Adam on a (P, n) parameter buffer, with exactly torch.optim.Adam's arithmetic (tests compare them).

    One set of kernels serves the whole population; torch.optim is avoided because its constructor
    imports torch._dynamo, which costs 1.3 s per process here.
    """

    def __init__(self, params: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)

    def step(self, grad: torch.Tensor) -> None:
        (b1, b2), self.t = self.betas, self.t + 1
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(self.eps)
        self.params.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - b1 ** self.t))


def checkpoint_steps(steps: int, count: int) -> list[int]:
    """About `count` log-spaced steps in [1, steps], always ending at `steps`."""
    return sorted({int(round(s)) for s in np.geomspace(1, steps, count)} | {steps})


def member_bytes(run_n: int, m: int, cfg: Config) -> int:
    """Rough peak memory of one population member during training and evaluation."""
    n_params = 2 * m * cfg.d + m + cfg.d
    batch = cfg.batch_size or run_n
    floats = (run_n + cfg.n_eval) * cfg.d + batch * (6 * m + 4 * cfg.d) + 4 * cfg.n_eval * m \
        + 6 * n_params + STREAM_STEPS * batch * 2 + (NOISE_STEPS * n_params if cfg.temperature > 0 else 0)
    return 4 * floats


def plan_chunks(runs: Sequence[Run], cfg: Config) -> list[list[int]]:
    """Group run indices by width (one tensor shape), and by N too in full-batch mode (one batch size), then
    cut each group to the memory budget."""
    budget = cfg.max_memory * 2**20
    shape = (lambda r: (r.m, r.n)) if cfg.batch_size == 0 else (lambda r: (r.m,))
    chunks = []
    for key in sorted({shape(r) for r in runs}):
        group = sorted((i for i, r in enumerate(runs) if shape(r) == key), key=lambda i: runs[i].n)
        m = key[0]
        chunk: list[int] = []
        for i in group:
            n_max = max([runs[j].n for j in chunk] + [runs[i].n])
            if chunk and (len(chunk) + 1) * member_bytes(n_max, m, cfg) > budget:
                chunks.append(chunk)
                chunk = []
            chunk.append(i)
        chunks.append(chunk)
    return chunks


def train_population(runs: Sequence[Run], cfg: Config, progress=None, checkpoints: Sequence[int] = (),
                     histograms: bool = False) -> list[dict]:
    """Train every run and return one dict of metrics per run, in the order given.

    Runs are trained as batched tensors, in chunks of equal width that fit --max-memory. A run's numbers
    do not depend on the chunk it lands in. At each step in `checkpoints`, recovery and the held-out
    objective are recorded (key 'trajectory').
    """
    device = resolve_device(cfg.device)
    results: list[dict] = [{} for _ in runs]
    for chunk in plan_chunks(runs, cfg):
        trained = _train_chunk([runs[i] for i in chunk], cfg, device, progress, checkpoints, histograms)
        for i, res in zip(chunk, trained):
            results[i] = res
    return results


def _train_chunk(runs: Sequence[Run], cfg: Config, device, progress, checkpoints, histograms) -> list[dict]:
    full_batch = cfg.batch_size == 0  # then every run of the chunk has the same N (plan_chunks)
    P, d, B = len(runs), runs[0].d, cfg.batch_size or runs[0].n
    weighted = cfg.decoder_norm == "weighted"
    data = [run_data(r, cfg.seed, cfg.n_eval) for r in runs]
    n_max, k_max = max(r.n for r in runs), max(r.k for r in runs)
    x_train = torch.zeros(P, n_max, d)
    truth = torch.zeros(P, k_max, d)        # true features as rows, zero-padded to K_max
    for i, (w, x, _) in enumerate(data):
        x_train[i, : len(x)] = x
        truth[i, : w.shape[1]] = w.T
    x_train, truth = x_train.to(device), truth.to(device)
    x_eval = torch.stack([x for _, _, x in data]).to(device)
    k_true = torch.tensor([r.k for r in runs], device=device)
    pen = PenaltySpec.of(runs, device)
    pop = init_population(runs, cfg, device)
    opt = Adam(pop.flat, lr=cfg.lr) if cfg.optimizer == "adam" else None
    batch_gens = [batch_generator(r, cfg.seed) for r in runs]
    noise_gens = [generator(cfg.seed, "langevin", r.key) for r in runs] if cfg.temperature > 0 else None
    offsets = torch.arange(P, device=device).unsqueeze(1) * n_max  # member i's samples start at row i * n_max
    flat_train = x_train.view(P * n_max, d)
    failed_at = [None] * P
    trajectory: list[tuple[int, dict]] = []
    wanted, reported = set(checkpoints), 0

    for start in range(0, cfg.steps, STREAM_STEPS):
        span = min(STREAM_STEPS, cfg.steps - start)
        if not full_batch:
            batches = torch.stack([torch.randint(r.n, (span, B), generator=g) for r, g in zip(runs, batch_gens)], 1)
            batches = (batches.to(device) + offsets).view(span, P * B)
        for t in range(span):
            step = start + t + 1
            x = x_train if full_batch else flat_train.index_select(0, batches[t]).view(P, B, d)
            grad = torch.cat([g.flatten(1) for g in gradients(pop, x, pen, weighted)], 1)
            if cfg.clip_grad > 0:  # per run, as torch.nn.utils.clip_grad_norm_ does for one model
                grad *= (cfg.clip_grad / (grad.norm(dim=1, keepdim=True) + 1e-6)).clamp_(max=1.0)
            if opt is not None:
                opt.step(grad)
            else:
                pop.flat.add_(grad, alpha=-cfg.lr)
            if noise_gens is not None:
                if (step - 1) % NOISE_STEPS == 0:
                    noise = _langevin_noise(noise_gens, min(NOISE_STEPS, cfg.steps - step + 1), pop.flat.shape[1],
                                            device)
                pop.flat.add_(noise[:, (step - 1) % NOISE_STEPS], alpha=math.sqrt(2 * cfg.lr * cfg.temperature))
            if not weighted:
                pop.w_dec /= column_norms(pop.w_dec).unsqueeze(1)
            if step % CHECK_EVERY == 0 or step == cfg.steps:
                _mark_failures(pop.flat, failed_at, step)
            if step in wanted:
                trajectory.append((step, _scores(pop, x_eval, truth, k_true, pen, weighted, cfg, full=False)))
            if progress is not None and (step % CHECK_EVERY == 0 or step == cfg.steps):
                progress.update(P * (step - reported))
                reported = step
    final = _scores(pop, x_eval, truth, k_true, pen, weighted, cfg, full=True, histograms=histograms)
    results = []
    for i in range(P):
        res = {name: float(v[i]) for name, v in final.items() if name != "z_hist"}
        res["z_hist"] = final["z_hist"][i] if histograms else None
        res["trajectory"] = [(s, {name: float(v[i]) for name, v in sc.items()}) for s, sc in trajectory]
        res["failed_step"] = failed_at[i]
        res["params"] = [t[i].cpu() for t in pop.tensors()]  # final (w_enc, b_enc, w_dec, b_dec)
        if failed_at[i] is None and not all(math.isfinite(v) for v in res.values() if isinstance(v, float)):
            res["failed_step"] = cfg.steps  # metrics overflowed although parameters stayed finite
        results.append(res)
    return results


def _langevin_noise(gens, span: int, n_params: int, device) -> torch.Tensor:
    """Standard normal noise (P, span, n_params), drawn per member so that a run's noise is its own."""
    return torch.stack([torch.randn(span, n_params, generator=g) for g in gens]).to(device)


def _mark_failures(flat: torch.Tensor, failed_at: list, step: int) -> None:
    for i, ok in enumerate(torch.isfinite(flat).all(1).tolist()):
        if not ok and failed_at[i] is None:
            failed_at[i] = step


# ---------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------

Z_EDGES = np.geomspace(1e-8, 1e2, 61)  # log bins for positive activations (clipped into this range)


def z_histogram(z: np.ndarray) -> np.ndarray:
    """Counts of activations: [exactly zero, then one count per log bin of Z_EDGES]."""
    pos = z[z > 0]
    return np.concatenate([[z.size - pos.size], np.histogram(np.clip(pos, Z_EDGES[0], Z_EDGES[-1]), Z_EDGES)[0]])


def cosine_matrix(w_dec: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|cos| between decoder rows (P, m, d) and true features (P, K, d): (P, m, K)."""
    a = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = truth / truth.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.bmm(a, b.transpose(1, 2)).abs()


def recovery_rate(cos: torch.Tensor, k_true: torch.Tensor, threshold: float) -> torch.Tensor:
    """(P,) fraction of the K true features whose best-matching decoder row has |cos| > threshold."""
    best = cos.max(1).values                                   # (P, K_max)
    valid = torch.arange(cos.shape[2], device=cos.device) < k_true.unsqueeze(1)
    return ((best > threshold) & valid).sum(1) / k_true


def mcc(cos: np.ndarray, k: int) -> float:
    """Mean |cos| over a one-to-one (Hungarian) matching of decoder rows to the K true features.

    Unmatched features (when m < K) count as 0. cos is (m, K).
    """
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(cos[:, :k], maximize=True)
    return float(cos[rows, cols].sum() / k)


def _scores(pop: Population, x_eval, truth, k_true, pen: PenaltySpec, weighted: bool, cfg: Config,
            full: bool, histograms: bool = False) -> dict:
    """Metrics of every member on its held-out set; `full` adds the costly ones (MCC, and with `histograms`
    the activation histograms)."""
    with torch.no_grad():
        _, z = encode(pop, x_eval)
        x_hat = decode(pop, z)
        cos = cosine_matrix(pop.w_dec.transpose(1, 2), truth)
        out = {"recovery": recovery_rate(cos, k_true, cfg.threshold).cpu(),
               "objective": objective(pop, x_eval, pen, weighted, z, x_hat).cpu()}
        if not full:
            return out
        valid = torch.arange(truth.shape[1], device=truth.device) < k_true.unsqueeze(1)
        active = z > 0
        out.update(
            mmcs=((cos.max(1).values * valid).sum(1) / k_true).cpu(),
            l0=active.sum(2).float().mean(1).cpu(),
            frac_zero=(~active).float().mean((1, 2)).cpu(),
            frac_below_eps=(active & (z < cfg.eps)).float().mean((1, 2)).cpu(),
            frac_below_delta=(active & (z < pen.delta)).float().mean((1, 2)).cpu(),
            dead=(~active.any(1)).float().mean(1).cpu(),
            fvu=((x_hat - x_eval).pow(2).sum((1, 2)) / (x_eval - x_eval.mean(1, keepdim=True)).pow(2).sum((1, 2))).cpu(),
        )
        cos_np = cos.cpu().numpy()
        ks = k_true.tolist()
        out["mcc"] = torch.tensor([mcc(c, k) if np.isfinite(c).all() else math.nan
                                   for c, k in zip(cos_np, ks)])
        if histograms:
            z_np = z.cpu().numpy().reshape(len(ks), -1)
            out["z_hist"] = [z_histogram(zi) if np.isfinite(zi).all() else None for zi in z_np]
        return out


# ---------------------------------------------------------------------------------------------------
# Sweeps: each builds its runs, trains them with the one trainer, and returns tidy rows.
# ---------------------------------------------------------------------------------------------------

def phase_runs(cfg: PhaseConfig) -> list[Run]:
    return [Run(n=n, p=p, m=cfg.width, k=cfg.k, d=cfg.d, lam=cfg.lam, seed=s, data_seed=s)
            for p in cfg.p_grid for n in cfg.n_grid for s in range(cfg.seeds)]


def huber_runs(cfg: HuberConfig) -> list[Run]:
    conventions = ("moreau", "torch") if cfg.huber_convention == "both" else (cfg.huber_convention,)
    common = dict(n=cfg.n, p=cfg.p, m=cfg.width, k=cfg.k, d=cfg.d, lam=cfg.lam)
    runs = [Run(**common, seed=s, data_seed=s) for s in range(cfg.seeds)]
    runs += [Run(**common, seed=s, data_seed=s, penalty="huber", delta=delta, convention=conv)
             for conv in conventions for delta in cfg.deltas for s in range(cfg.seeds)]
    return runs


def width_runs(cfg: WidthConfig) -> list[Run]:
    return [Run(n=cfg.n, p=cfg.p, m=mult * cfg.d, k=k, d=cfg.d, lam=cfg.lam, seed=s, data_seed=ds)
            for k in cfg.k_grid for ds in range(cfg.data_seeds) for mult in cfg.widths for s in range(cfg.seeds)]


BUILD_RUNS = {"phase": phase_runs, "huber": huber_runs, "width": width_runs}
METRICS = ("recovery", "mmcs", "mcc", "l0", "frac_zero", "frac_below_eps", "frac_below_delta", "dead", "fvu",
           "objective")


def run_sweep(name: str, cfg: Config, progress=None) -> dict:
    """Train a sweep's runs and return its tables: 'runs' (one row per run) and, where used, 'z_hist', 'trajectory'."""
    runs = BUILD_RUNS[name](cfg)
    checkpoints = checkpoint_steps(cfg.steps, cfg.checkpoints) if name == "width" else ()
    results = train_population(runs, cfg, progress, checkpoints, histograms=name == "huber")
    return tabulate(name, runs, results)


def tabulate(name: str, runs: Sequence[Run], results: Sequence[dict]) -> dict:
    """Tidy tables from the trainer's results: one row per run; failed runs keep their key, metrics NaN."""
    import pandas as pd
    rows, hists, traj = [], [], []
    for r, res in zip(runs, results):
        failed = res["failed_step"] is not None
        row = dict(key=r.key, **dataclasses.asdict(r), status="failed" if failed else "ok",
                   failed_step=res["failed_step"] if failed else "",
                   failure="non-finite parameters or metrics (diverged)" if failed else "")
        row.update({m: (math.nan if failed else res[m]) for m in METRICS})
        rows.append(row)
        if name == "huber" and not failed:
            hists.append([r.key] + list(res["z_hist"]))
        if name == "width":
            traj += [dict(key=r.key, step=s, recovery=v["recovery"], objective=v["objective"])
                     for s, v in res["trajectory"]]
    tables = {"runs": pd.DataFrame(rows)}
    if name == "huber":
        tables["z_hist"] = pd.DataFrame(hists, columns=["key", "zero"] + [f"{e:.3g}" for e in Z_EDGES[:-1]])
    if name == "width":
        tables["trajectory"] = pd.DataFrame(traj, columns=["key", "step", "recovery", "objective"])
    return tables


# ---------------------------------------------------------------------------------------------------
# Theory references and statistics.
# ---------------------------------------------------------------------------------------------------

def cs_threshold(delta: float, kappa: float) -> float:
    """Donoho-Tanner / Donoho-Maleki-Montanari l1 phase transition rho(delta), delta = d/K (undersampling).

    rho(delta) = max_z [1 - (kappa/delta) g(z)] / [1 + z^2 - kappa g(z)], g(z) = (1+z^2) Phi(-z) - z phi(z);
    kappa = 2 for signed, 1 for non-negative coefficients. Sparsity p* = rho * delta: at delta = 0.5,
    p* = 0.193 (signed) and 0.279 (non-negative).
    """
    from scipy.optimize import minimize_scalar
    from scipy.stats import norm
    g = lambda z: (1 + z * z) * norm.cdf(-z) - z * norm.pdf(z)
    res = minimize_scalar(lambda z: -(1 - kappa / delta * g(z)) / (1 + z * z - kappa * g(z)),
                          bounds=(0.0, 10.0), method="bounded", options=dict(xatol=1e-10))
    return float(-res.fun)


def compare(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Mann-Whitney U test of b against a, with mean difference (b - a) and rank-biserial effect.

    Mann-Whitney rather than Welch: recovery is bounded and discrete (multiples of 1/K) and L0 is skewed,
    so a rank test makes no normality assumption. Runs compared across penalties share data, initialisation
    and minibatches; an unpaired test ignores that pairing, which makes it conservative, not liberal.
    Identical samples give p = 1.
    """
    from scipy.stats import mannwhitneyu
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return dict(diff=math.nan, effect=math.nan, p=math.nan)
    if np.array_equal(np.sort(a), np.sort(b)) or np.ptp(np.concatenate([a, b])) == 0:
        p, u = 1.0, len(a) * len(b) / 2
    else:
        u, p = mannwhitneyu(b, a, alternative="two-sided")
    return dict(diff=float(b.mean() - a.mean()), effect=float(2 * u / (len(a) * len(b)) - 1), p=float(p))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, float)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok])]
    adj = np.full_like(p, np.nan)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        adj[i] = running
    return adj.tolist()


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> dict:
    """OLS slope of log y on log x with a 95% confidence interval (points with y <= 0 are dropped)."""
    from scipy.stats import linregress, t
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = (y > 0) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0:
        return dict(slope=math.nan, lo=math.nan, hi=math.nan, intercept=math.nan, points=int(keep.sum()))
    fit = linregress(np.log(x[keep]), np.log(y[keep]))
    half = t.ppf(0.975, keep.sum() - 2) * fit.stderr
    return dict(slope=fit.slope, lo=fit.slope - half, hi=fit.slope + half, intercept=fit.intercept,
                points=int(keep.sum()))


# ---------------------------------------------------------------------------------------------------
# Analyses: numbers and verdicts from the tidy rows (shared by training runs and `plot`).
# ---------------------------------------------------------------------------------------------------

def _ok(df):
    return df[df.status == "ok"]


def _fmt_failures(df) -> str:
    n_fail = int((df.status != "ok").sum())
    return f"; {n_fail} of {len(df)} runs failed (diverged) and are excluded" if n_fail else ""


def analyse_phase(tables: dict, cfg: PhaseConfig) -> dict:
    from scipy.stats import spearmanr
    df = tables["runs"]
    ok = _ok(df)
    cells = ok.groupby(["p", "n"]).recovery.agg(["mean", "std", "count"]).reset_index()
    parts, holds = [], []

    low = cells[(cells.p <= 0.1 + 1e-9) & (cells.n >= 500)]
    if len(low):
        good = bool((low["mean"] >= 0.95).all())
        parts.append(f"p <= 0.1, N >= 500: cell means {low['mean'].min():.2f}-{low['mean'].max():.2f} "
                     f"(claim: almost perfect, tested as every cell >= 0.95): {'holds' if good else 'fails'}")
        holds.append(good)

    near = min(cfg.p_grid, key=lambda p: abs(p - 0.2))
    mid = ok[np.isclose(ok.p, near)]
    if abs(near - 0.2) <= 0.05 + 1e-9 and mid.n.nunique() >= 3:
        rho, pval = spearmanr(np.log(mid.n), mid.recovery)
        by_n = mid.groupby("n").recovery.mean()
        good = bool(rho > 0 and pval < 0.05)
        parts.append(f"p = {near:g}: recovery {by_n.iloc[0]:.2f} at N={by_n.index[0]} -> {by_n.iloc[-1]:.2f} at "
                     f"N={by_n.index[-1]} (claim 0.3 -> 0.6), Spearman rho(log N, recovery) = {rho:.2f}, "
                     f"p = {pval:.2g}: increase with N {'holds' if good else 'fails'}")
        holds.append(good)

    high = cells[cells.p >= 0.4 - 1e-9]
    if len(high):
        good = bool((high["mean"] < 0.5).all())
        parts.append(f"p >= 0.4: cell means {high['mean'].min():.2f}-{high['mean'].max():.2f} "
                     f"(claim: fails, tested as every cell < 0.5): {'holds' if good else 'fails'}")
        holds.append(good)

    delta = cfg.d / cfg.k
    p_star = {"signed": cs_threshold(delta, 2) * delta, "nonneg": cs_threshold(delta, 1) * delta}
    n_top = max(cfg.n_grid)
    top = cells[cells.n == n_top].sort_values("p")
    p_90, p_half, p_10 = (_crossing(top.p.to_numpy(), top["mean"].to_numpy(), level) for level in (0.9, 0.5, 0.1))
    at = lambda level, p: f"{level} at p = {p:.3f}" if np.isfinite(p) else f"{level} not by p = {max(cfg.p_grid):g}"
    # a sharp transition goes from 0.9 to 0.1 over a narrow range of p
    parts.append(f"at N={n_top} recovery falls through {at(0.9, p_90)}, {at(0.5, p_half)}, {at(0.1, p_10)}; "
                 f"compressed-sensing l1 thresholds p* = {p_star['signed']:.3f} (signed), "
                 f"{p_star['nonneg']:.3f} (non-negative)")
    verdict = ("inconclusive" if len(holds) < 3 else "supported" if all(holds) else "not supported")
    return dict(hypothesis="H1", verdict=verdict, cells=cells, p_star=p_star, p_half=p_half, p_90=p_90, p_10=p_10,
                claim="recovery switches sharply over N x p: p <= 0.1 recovers almost perfectly from N = 500, "
                      "p ~ 0.2 climbs from ~0.3 to ~0.6 with N, p >= 0.4 fails",
                measured="; ".join(parts) + _fmt_failures(df) + f"; {cfg.seeds} seeds per cell",
                test="cell means against the stated bounds; Spearman rank correlation for the N-trend")


def _crossing(x: np.ndarray, y: np.ndarray, level: float) -> float:
    """First x at which y falls through `level`, by linear interpolation; NaN if it never does."""
    for i in range(len(x) - 1):
        if y[i] >= level > y[i + 1]:
            return float(x[i] + (y[i] - level) / (y[i] - y[i + 1]) * (x[i + 1] - x[i]))
    return math.nan


def analyse_huber(tables: dict, cfg: HuberConfig) -> dict:
    df = tables["runs"]
    ok = _ok(df)
    l1 = ok[ok.penalty == "l1"]
    stats = []
    for (conv, delta), grp in ok[ok.penalty == "huber"].groupby(["convention", "delta"]):
        for metric in ("recovery", "mcc", "l0", "frac_below_eps"):
            c = compare(l1[metric], grp[metric])
            stats.append(dict(convention=conv, delta=delta, metric=metric, l1_mean=float(l1[metric].mean()),
                              huber_mean=float(grp[metric].mean()), n_l1=len(l1), n_huber=len(grp), **c))
    for metric in {s["metric"] for s in stats}:  # Holm within each metric's family of comparisons
        fam = [s for s in stats if s["metric"] == metric]
        for s, adj in zip(fam, holm([s["p"] for s in fam])):
            s["p_holm"] = adj
    # With n seeds a side, the smallest two-sided Mann-Whitney p is 2 / C(2n, n); Holm multiplies it by the
    # family size. If that cannot reach alpha, "no significant difference" means nothing.
    n_min = min((min(s["n_l1"], s["n_huber"]) for s in stats), default=0)
    family = len([s for s in stats if s["metric"] == "recovery"])
    underpowered = n_min == 0 or 2 / math.comb(2 * n_min, n_min) * family >= cfg.alpha
    verdicts, parts = {}, []
    by_key = {(s["convention"], s["delta"], s["metric"]): s for s in stats}
    for conv in sorted({s["convention"] for s in stats}):
        d_min = min(s["delta"] for s in stats if s["convention"] == conv)
        rec, l0 = by_key[conv, d_min, "recovery"], by_key[conv, d_min, "l0"]
        worse_rec = rec["diff"] < 0 and rec["p_holm"] < cfg.alpha
        worse_l0 = l0["diff"] > 0 and l0["p_holm"] < cfg.alpha
        better = (rec["diff"] > 0 and rec["p_holm"] < cfg.alpha) or (l0["diff"] < 0 and l0["p_holm"] < cfg.alpha)
        v = ("supported" if worse_rec and worse_l0 else
             "inconclusive" if underpowered or worse_rec != worse_l0 else "not supported")
        verdicts[conv] = v
        parts.append(f"{conv}: at delta={d_min:g} recovery {rec['huber_mean']:.3f} vs L1 {rec['l1_mean']:.3f} "
                     f"(Holm p = {rec['p_holm']:.2g}), L0 {l0['huber_mean']:.2f} vs {l0['l1_mean']:.2f} "
                     f"(Holm p = {l0['p_holm']:.2g}){' (Huber significantly better on one)' if better else ''}"
                     f" -> {v}")
    verdict = ("supported" if all(v == "supported" for v in verdicts.values()) else
               "not supported" if all(v == "not supported" for v in verdicts.values()) else
               "supported for " + ", ".join(c for c, v in verdicts.items() if v == "supported") + " only"
               if any(v == "supported" for v in verdicts.values()) else "inconclusive")
    return dict(hypothesis="H2", verdict=verdict, verdicts=verdicts, stats=stats,
                claim="Huber smoothing, even at delta = 1e-3, gives significantly worse recovery and sparsity "
                      "than exact L1",
                measured="; ".join(parts) + _fmt_failures(df) + f"; N={cfg.n}, p={cfg.p:g}, {cfg.seeds} seeds"
                         + (" (too few seeds for a Holm-corrected test to reach significance)" if underpowered else ""),
                test=f"two-sided Mann-Whitney U per delta and metric vs L1, Holm-corrected, alpha = {cfg.alpha:g}")


def analyse_width(tables: dict, cfg: WidthConfig) -> dict:
    df = tables["runs"]
    ok = _ok(df).assign(m_over_d=lambda t: t.m / t.d, m_over_k=lambda t: t.m / t.k)
    curves = ok.groupby(["k", "m"]).agg(recovery=("recovery", "mean"), recovery_sd=("recovery", "std"),
                                        objective=("objective", "mean"), runs=("recovery", "size")).reset_index()
    # Spread across initialisation seeds at fixed data, averaged over datasets.
    spread = (ok.groupby(["k", "data_seed", "m"]).agg(sd_objective=("objective", "std"),
                                                       sd_recovery=("recovery", "std"))
              .groupby(["k", "m"]).mean().reset_index())
    parts, sat, degraded, per_k = [], {}, {}, {}
    for k, c in curves.groupby("k"):
        c = c.sort_values("m")
        first = c[c.recovery >= c.recovery.max() - 0.02].m.iloc[0]
        # the widest width cannot show a plateau by itself: saturation needs a narrower width within 0.02
        saturated = first < c.m.max()
        sat[int(k)] = int(first) if saturated else None
        widest, at_sat = ok[(ok.k == k) & (ok.m == c.m.max())], ok[(ok.k == k) & (ok.m == first)]
        deg = compare(at_sat.recovery, widest.recovery)
        degraded[int(k)] = deg["diff"] < -0.05 and deg["p"] < 0.05
        per_k[int(k)] = saturated and first / cfg.d <= 4 and not degraded[int(k)]
        where = (f"saturates (within 0.02 of the best mean) at m = {first / cfg.d:g}d = {first / k:g}K; widest vs "
                 f"saturation width: {deg['diff']:+.3f} (Mann-Whitney p = {deg['p']:.2g})" if saturated else
                 f"no saturation within the grid (still rising at m = {first / cfg.d:g}d)")
        parts.append(f"K={k}: recovery " + ", ".join(f"{r.recovery:.2f}@{r.m / cfg.d:g}d" for r in c.itertuples())
                     + f"; {where}")
    collapse = {}
    if len(sat) >= 2:
        for ratio in ("d", "k"):
            xs = {k: np.log(c.m.to_numpy() / (cfg.d if ratio == "d" else k)) for k, c in curves.groupby("k")}
            ys = {k: c.recovery.to_numpy() for k, c in curves.groupby("k")}
            collapse[ratio] = _curve_gap(xs, ys)
        parts.append(f"curve gap between K values: {collapse['d']:.3f} against m/d, {collapse['k']:.3f} against "
                     f"m/K (mean |difference| on the shared range; the smaller collapses the curves)")
    fits = {}
    for k, s in spread.groupby("k"):
        fits[int(k)] = {q: loglog_slope(s.m, s[q]) for q in ("sd_objective", "sd_recovery")}
        f = fits[int(k)]["sd_objective"]
        parts.append(f"K={k}: seed-to-seed sd of the objective ~ m^{f['slope']:.2f} "
                     f"[95% CI {f['lo']:.2f}, {f['hi']:.2f}] (mean-field: -0.5)")
    conv = _convergence(tables.get("trajectory"), ok)
    parts.append(conv["text"])
    verdict = ("inconclusive" if len(cfg.widths) < 2 or not per_k else
               "supported" if all(per_k.values()) else "not supported" if not any(per_k.values()) else
               "supported for " + ", ".join(f"K={k}" for k, v in per_k.items() if v) + " only")
    return dict(hypothesis="H3", verdict=verdict, curves=curves, spread=spread, fits=fits, saturation=sat,
                degraded=degraded, collapse=collapse, convergence=conv,
                claim="recovery saturates near m = 4d and does not degrade for wider networks (mean-field limit)",
                measured="; ".join(parts) + _fmt_failures(df) +
                         f"; N={cfg.n}, p={cfg.p:g}, {cfg.data_seeds} datasets x {cfg.seeds} init seeds",
                test="per K: supported if the first width within 0.02 of the best mean is narrower than the widest "
                     "and <= 4d, and the widest is not worse than it (Mann-Whitney U: by > 0.05 with p < 0.05); "
                     "fluctuations: log-log OLS slope with 95% CI")


def _curve_gap(xs: dict, ys: dict) -> float:
    """Mean absolute difference between recovery curves of different K, interpolated on their shared x range."""
    keys = sorted(xs)
    lo, hi = max(xs[k].min() for k in keys), min(xs[k].max() for k in keys)
    if hi <= lo:
        return math.nan
    grid = np.linspace(lo, hi, 50)
    curves = np.array([np.interp(grid, xs[k], ys[k]) for k in keys])
    return float(np.abs(curves - curves.mean(0)).mean())


def _convergence(traj, ok) -> dict:
    """Relative change of the held-out objective over the last half of training, per width."""
    import pandas as pd
    if traj is None or len(traj) == 0:
        return dict(text="no trajectories recorded", table=None)
    t = traj.merge(ok[["key", "m", "k"]], on="key")
    last = t.step.max()
    half = t[t.step <= last / 2].step.max()
    if not np.isfinite(half):
        return dict(text="too few checkpoints to judge convergence", table=None)
    piv = t[t.step.isin([half, last])].groupby(["k", "m", "step"])[["objective", "recovery"]].mean().unstack("step")
    rel = (piv[("objective", half)] - piv[("objective", last)]) / piv[("objective", last)].abs()
    drec = piv[("recovery", last)] - piv[("recovery", half)]
    table = pd.DataFrame(dict(rel_objective_drop=rel, recovery_gain=drec))
    widest = table.reset_index().sort_values("m").groupby("k").tail(1)
    text = f"convergence at the widest m, change from step {int(half)} to {int(last)}: " + ", ".join(
        f"K={int(r.k)}: held-out objective {-100 * r.rel_objective_drop:+.1f}%, recovery {r.recovery_gain:+.3f}"
        for r in widest.itertuples())
    return dict(text=text, table=table, half=int(half), last=int(last))


ANALYSES = {"phase": analyse_phase, "huber": analyse_huber, "width": analyse_width}


# ---------------------------------------------------------------------------------------------------
# Plotting: each function draws what it is given and returns the figure; saving is separate.
# ---------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_phase(tables: dict, cfg: PhaseConfig, res: dict):
    plt = _pyplot()
    from matplotlib.patches import Patch
    cells = res["cells"]
    ps, ns = sorted(cfg.p_grid), sorted(cfg.n_grid)
    mean = np.full((len(ps), len(ns)), np.nan)
    sd = np.full_like(mean, np.nan)
    for c in cells.itertuples():
        i, j = ps.index(c.p), ns.index(c.n)
        mean[i, j], sd[i, j] = c.mean, c.std
    fig, ax = plt.subplots(figsize=(1.3 * len(ns) + 3.5, 0.75 * len(ps) + 2.2))
    ax.set_facecolor("0.75")
    im = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", vmin=0, vmax=1, aspect="auto", origin="upper")
    for i in range(len(ps)):
        for j in range(len(ns)):
            if np.isfinite(mean[i, j]):
                ax.text(j, i, f"{mean[i, j]:.2f}\n±{0 if np.isnan(sd[i, j]) else sd[i, j]:.2f}", ha="center",
                        va="center", fontsize=8, color="white" if mean[i, j] < 0.6 else "black")
            else:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.3"))
    handles = []
    if len(ps) > 1 and len(ns) > 1 and np.nanmin(mean) < 0.5 < np.nanmax(mean):
        ax.contour(np.arange(len(ns)), np.arange(len(ps)), np.nan_to_num(mean, nan=0.0), levels=[0.5],
                   colors="red", linewidths=2)
        handles.append(plt.Line2D([], [], color="red", lw=2, label="recovery = 0.5 contour"))
    for (name, p_star), style in zip(res["p_star"].items(), ("--", ":")):
        y = np.interp(p_star, ps, np.arange(len(ps)), left=-0.5, right=len(ps) - 0.5)
        label = f"CS l1 threshold p* = {p_star:.3f} ({'signed' if name == 'signed' else 'non-negative'})"
        handles.append(ax.axhline(y, color="black", ls=style, lw=2, label=label))
    if np.isnan(mean).any():
        handles.append(Patch(facecolor="0.75", hatch="//", edgecolor="0.3", label="all runs failed"))
    ax.set_xticks(range(len(ns)), [str(n) for n in ns])
    ax.set_yticks(range(len(ps)), [f"{p:g}" for p in ps])
    ax.set_xlabel("training samples N")
    ax.set_ylabel("sparsity p (probability a feature is active)")
    ax.set_title(f"Feature recovery of ReLU SAEs (d={cfg.d}, K={cfg.k}, m={cfg.width}, L1 lam={cfg.lam:g}, "
                 f"{cfg.steps} steps)\nmean ± sd over {cfg.seeds} seeds; recovered = |cos| > {cfg.threshold:g}",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="recovery rate (fraction of K features)")
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_huber(tables: dict, cfg: HuberConfig, res: dict):
    plt = _pyplot()
    df = _ok(tables["runs"])
    hist = tables["z_hist"].set_index("key")
    conventions = sorted(df[df.penalty == "huber"].convention.unique())
    fig, axes = plt.subplots(2, max(2, len(conventions)), figsize=(12, 9))
    cmap = plt.get_cmap("plasma")
    deltas = sorted(cfg.deltas, reverse=True)
    edges = Z_EDGES

    def ecdf(keys):
        counts = hist.loc[list(keys)].to_numpy(float).sum(0)
        cum = np.cumsum(counts) / counts.sum()
        return cum[0], cum[1:]  # mass at exactly zero, then P(z <= upper edge of each log bin)

    l1_keys = df[df.penalty == "l1"].key
    for ax, conv in zip(axes[0], conventions):
        zero, cum = ecdf(l1_keys)
        ax.step(edges[1:], cum, where="post", color="black", lw=2.5, label=f"L1 (P[z=0] = {zero:.3f})")
        for i, delta in enumerate(deltas):
            keys = df[(df.convention == conv) & (df.delta == delta) & (df.penalty == "huber")].key
            if len(keys):
                zero, cum = ecdf(keys)
                ax.step(edges[1:], cum, where="post", color=cmap(i / max(1, len(deltas) - 1) * 0.85),
                        label=f"δ={delta:g} (P[z=0] = {zero:.3f})")
        ax.axvline(cfg.eps, color="0.5", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(1e-8, 1e2)
        ax.set_xlabel("activation z (log scale; z < 1e-8 shown at 1e-8)")
        ax.set_ylabel("P(activation ≤ z)  (value at left edge = exactly-zero mass)")
        ax.set_title(f"Activation ECDF, Huber convention '{conv}'\n(held-out data, all seeds pooled; dotted: ε={cfg.eps:g})",
                     fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    l1 = df[df.penalty == "l1"]
    for ax, metric, label in ((axes[1][0], "recovery", f"recovery rate (|cos| > {cfg.threshold:g})"),
                              (axes[1][1], "l0", "L0: mean active latents per sample")):
        mu, sd = l1[metric].mean(), l1[metric].std()
        ax.axhspan(mu - sd, mu + sd, color="black", alpha=0.12)
        ax.axhline(mu, color="black", lw=2, label=f"L1: {mu:.3f} ± {sd:.3f} (band: ± sd)")
        for conv, marker in zip(conventions, ("o", "s")):
            g = df[(df.penalty == "huber") & (df.convention == conv)].groupby("delta")[metric]
            m, s = g.mean(), g.std()
            ax.errorbar(m.index, m.values, yerr=s.values, marker=marker, capsize=3,
                        label=f"Huber, {conv} convention (mean ± sd)")
            for st in res["stats"]:
                if st["convention"] == conv and st["metric"] == metric and st["p_holm"] < cfg.alpha:
                    ax.annotate("*", (st["delta"], m.loc[st["delta"]]), textcoords="offset points", xytext=(6, 4))
        ax.set_xscale("log")
        ax.set_xlabel("Huber width δ (log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(':')[0].split(' (')[0]} vs δ; * = differs from L1 (Holm p < {cfg.alpha:g})",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if len(conventions) == 1:
        axes[0][1].axis("off")
    fig.suptitle(f"Exact L1 vs Huber smoothing (N={cfg.n}, p={cfg.p:g}, d={cfg.d}, K={cfg.k}, m={cfg.width}, "
                 f"lam={cfg.lam:g}, {cfg.seeds} seeds). Verdict H2: {res['verdict']}", fontsize=11)
    fig.tight_layout()
    return fig


def plot_width(tables: dict, cfg: WidthConfig, res: dict):
    plt = _pyplot()
    df = _ok(tables["runs"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ks = sorted(df.k.unique())
    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(ks)}
    for ax, ratio in ((axes[0][0], "d"), (axes[0][1], "K")):
        for k in ks:
            c = res["curves"][res["curves"].k == k].sort_values("m")
            x = c.m / (cfg.d if ratio == "d" else k)
            runs = df[df.k == k]
            jitter = 1 + 0.04 * (runs.seed - runs.seed.mean()) / max(1, runs.seed.max())
            ax.scatter(runs.m / (cfg.d if ratio == "d" else k) * jitter, runs.recovery, s=6, alpha=0.25,
                       color=colors[k])
            ax.errorbar(x, c.recovery, yerr=c.recovery_sd, marker="o", capsize=3, color=colors[k],
                        label=f"K={k} (mean ± sd; dots: runs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"hidden width m / {ratio}")
        ax.set_ylabel(f"recovery rate (|cos| > {cfg.threshold:g})")
        ax.set_title(f"Recovery vs m/{ratio}" + (" (the note's claim: saturation near 4)" if ratio == "d" else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[1][0]
    for k in ks:
        s = res["spread"][res["spread"].k == k].sort_values("m")
        for q, marker, ls in (("sd_objective", "o", "-"), ("sd_recovery", "^", "--")):
            f = res["fits"][int(k)][q]
            keep = s[q] > 0
            ax.plot(s.m[keep], s[q][keep], marker=marker, ls="none", color=colors[k])
            if np.isfinite(f["slope"]):
                ax.plot(s.m, np.exp(f["intercept"]) * s.m ** f["slope"], ls=ls, color=colors[k],
                        label=f"K={k} sd({q[3:]}) ~ m^{f['slope']:.2f} [{f['lo']:.2f}, {f['hi']:.2f}]")
    m_ref = np.array(sorted(df.m.unique()), float)
    if len(res["spread"]):
        y0 = res["spread"].sd_objective[res["spread"].m == m_ref[0]].mean()
        ax.plot(m_ref, y0 * (m_ref / m_ref[0]) ** -0.5, color="0.4", ls=":", label="mean-field reference m^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("hidden width m")
    ax.plot([], [], "ko", label="o: sd of the held-out objective")
    ax.plot([], [], "k^", label="^: sd of recovery (zero-spread points omitted)")
    ax.set_ylabel("seed-to-seed sd (init seeds, data fixed)")
    ax.set_title("Fluctuations vs width (fit: OLS on log-log, 95% CI)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1][1]
    traj = tables.get("trajectory")
    if traj is not None and len(traj):
        t = traj.merge(df[["key", "m", "k"]], on="key")
        t = t[t.k == ks[0]].groupby(["m", "step"]).recovery.mean().reset_index()
        cmap = plt.get_cmap("viridis")
        ms = sorted(t.m.unique())
        for i, m in enumerate(ms):
            tm = t[t.m == m]
            ax.plot(tm.step, tm.recovery, marker=".", color=cmap(i / max(1, len(ms) - 1)),
                    label=f"m = {m / cfg.d:g}d")
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("mean recovery rate")
    ax.set_title(f"Convergence: recovery during training (K={ks[0]}); flat ends = converged", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Width scaling (N={cfg.n}, p={cfg.p:g}, d={cfg.d}, lam={cfg.lam:g}, {cfg.steps} steps, "
                 f"{cfg.data_seeds} datasets x {cfg.seeds} init seeds). Verdict H3: {res['verdict']}", fontsize=11)
    fig.tight_layout()
    return fig


PLOTS = {"phase": plot_phase, "huber": plot_huber, "width": plot_width}


# ---------------------------------------------------------------------------------------------------
# Saving and loading: every file is written to a temporary name and renamed into place, all of a sweep's
# files together, so an interrupted or failed run never leaves a half-written or mismatched set.
# ---------------------------------------------------------------------------------------------------

CSV_FLOAT = "%.8g"  # float32 metrics need 8 significant digits


def script_hash() -> str:
    return hashlib.sha256(SCRIPT_PATH.read_bytes()).hexdigest()


def versions() -> dict:
    import matplotlib
    import pandas
    import scipy
    return dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
                scipy=scipy.__version__, matplotlib=matplotlib.__version__, pandas=pandas.__version__)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    desc = f"{platform.system()} {cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        desc += f", GPU {torch.cuda.get_device_name(device)}"
    return desc


class _DeferSigint:
    """Hold Ctrl-C back while files are renamed into place, then deliver it."""

    def __enter__(self):
        self.hit = False
        try:
            self.old = signal.signal(signal.SIGINT, lambda *_: setattr(self, "hit", True))
        except ValueError:  # not the main thread: nothing to defer
            self.old = None
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit:
            raise KeyboardInterrupt


UMASK = os.umask(0)
os.umask(UMASK)


def commit_files(files: dict[Path, bytes]) -> None:
    temps: dict[Path, str] = {}
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp creates 0600; give the file the mode open() would
        with _DeferSigint():
            for path, tmp in temps.items():
                os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


def figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    _pyplot().close(fig)
    return buf.getvalue()


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return None  # tables and figures live in their own files


def table_paths(name: str, out: Path) -> dict[str, Path]:
    base = FIGURES[name]
    paths = {"runs": out / f"{base}.csv"}
    if name == "huber":
        paths["z_hist"] = out / f"{base}_hist.csv"
    if name == "width":
        paths["trajectory"] = out / f"{base}_trajectory.csv"
    return paths


def sweep_files(name: str, cfg: Config, tables: dict, res: dict, meta: dict | None) -> dict[Path, bytes]:
    """The PNG (and, after training, the CSV tables and the JSON record) of one sweep, rendered to bytes."""
    out = Path(cfg.out_dir)
    files = {out / f"{FIGURES[name]}.png": figure_bytes(PLOTS[name](tables, cfg, res))}
    if meta is not None:
        for key, path in table_paths(name, out).items():
            files[path] = tables[key].to_csv(index=False, float_format=CSV_FLOAT).encode()
        record = dict(meta, verdict={k: res[k] for k in ("hypothesis", "verdict", "claim", "measured", "test")},
                      results={k: v for k, v in res.items() if k in ("stats", "fits", "saturation", "collapse",
                                                                      "degraded", "p_star", "p_90", "p_half", "p_10",
                                                                      "verdicts")})
        files[out / f"{FIGURES[name]}.json"] = json.dumps(_jsonable(record), indent=1).encode()
    return files


def csv_roundtrip(tables: dict) -> dict:
    """The tables as they will read back from their CSV files, so that the verdicts printed now and those
    re-plotted later come from the very same numbers."""
    import pandas as pd
    return {k: pd.read_csv(io.StringIO(t.to_csv(index=False, float_format=CSV_FLOAT))) for k, t in tables.items()}


def load_sweep(name: str, out: Path) -> tuple[Config, dict, dict]:
    """Read a sweep's saved JSON and CSV tables back, rejecting missing, truncated or mismatched files."""
    import pandas as pd
    meta_path = out / f"{FIGURES[name]}.json"
    try:
        meta = json.loads(meta_path.read_text())
        cls = SWEEP_CONFIGS[meta["sweep"]]
        if meta["sweep"] != name:
            raise UsageError(f"{meta_path} records sweep {meta['sweep']!r}, not {name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items() if k in known})
        cfg.out_dir = str(out)
    except FileNotFoundError:
        raise UsageError(f"{meta_path} is missing: run `{name}` first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{meta_path} is not a complete record of a {name} run ({type(e).__name__}: {e})") from None
    tables = {}
    for key, path in table_paths(name, out).items():
        try:
            tables[key] = pd.read_csv(path, keep_default_na=True)
        except FileNotFoundError:
            raise UsageError(f"{path} is missing: run `{name}` first") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise UsageError(f"{path} cannot be read: {e}") from None
    runs = tables["runs"]
    need = {"key", "status", *METRICS, *(f.name for f in dataclasses.fields(Run))}
    if not need <= set(runs.columns):
        raise UsageError(f"{table_paths(name, out)['runs']} lacks columns {sorted(need - set(runs.columns))}")
    if runs.key.tolist() != meta.get("run_keys"):
        raise UsageError(f"{table_paths(name, out)['runs']} has {len(runs)} rows that do not match the "
                         f"{len(meta.get('run_keys', []))} runs recorded in {meta_path} (truncated or from another run)")
    runs["failed_step"] = runs.failed_step.astype(object)
    return cfg, tables, meta


def summary_markdown(results: dict, metas: dict) -> str:
    lines = ["# Summary: three hypotheses about how ReLU SAEs learn", "",
             "Produced by `sae_phase_transition.py` (sha256 " + next(iter(metas.values()))["script_sha256"][:12]
             + "). Verdicts follow from the numbers below, never from the note.", "",
             "| hypothesis | claim (from the note) | measured | test | verdict |", "|---|---|---|---|---|"]
    for name, res in results.items():
        cells = [f"{res['hypothesis']} ({name})", res["claim"], res["measured"], res["test"], f"**{res['verdict']}**"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "| sweep | runs | wall time | device |", "|---|---|---|---|"]
    for name, meta in metas.items():
        lines.append(f"| {name} | {meta['n_runs']} | {meta['wall_time_s']:.1f} s | {meta['machine']} |")
    v = next(iter(metas.values()))["versions"]
    lines += ["", "Package versions: " + ", ".join(f"{k} {val}" for k, val in v.items()), ""]
    return "\n".join(lines)


def print_verdict(res: dict) -> None:
    print(f"\n{res['hypothesis']} verdict: {res['verdict'].upper()}\n  claim:    {res['claim']}\n"
          f"  measured: {res['measured']}\n  test:     {res['test']}")


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _grid(kind):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"cannot parse {text!r} as a comma-separated list of {kind.__name__}") from None
        if not values:
            raise argparse.ArgumentTypeError("the grid is empty")
        return values
    return parse


def add_config_options(parser: argparse.ArgumentParser, cls: type, sweeps: Sequence[type] = ()) -> None:
    """One option per field of `cls`; with `sweeps`, a default that differs between them is listed per sweep."""
    for f in dataclasses.fields(cls):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        own = {name: getattr(sweep(), f.name) for name, sweep in SWEEP_CONFIGS.items() if sweep in sweeps}
        if len(set(own.values())) > 1:
            shown = ", ".join(f"{name} {value}" for name, value in own.items())
        help_ = f"{meta['help']} (default: {shown})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=meta["help"])
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=_grid(meta["kind"]), default=argparse.SUPPRESS, metavar="LIST",
                                help=help_ + "; comma-separated")
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, choices=meta.get("choices"),
                                help=help_)


def make_config(cls: type, given: dict) -> Config:
    """Defaults, then the --quick preset, then what the user gave explicitly."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(cls.QUICK) if given.get("quick") else {}
    values.update(given)
    return cls(**{k: v for k, v in values.items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae_phase_transition.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {"phase": "H1: recovery over sample count N x sparsity p (phase diagram)",
             "huber": "H2: exact L1 vs Huber smoothing with shrinking delta",
             "width": "H3: hidden width m scaling (mean-field limit)"}
    for name, cls in SWEEP_CONFIGS.items():
        add_config_options(sub.add_parser(name, help=helps[name], description=helps[name]), cls)
    add_config_options(sub.add_parser("all", help="all three sweeps with their defaults, plus summary.md",
                                      description="Run phase, huber and width; options given apply to all three."),
                       Config, sweeps=tuple(SWEEP_CONFIGS.values()))
    plot = sub.add_parser("plot", help="redraw figures and verdicts from saved CSV/JSON, without training")
    plot.add_argument("sweep", choices=(*SWEEP_CONFIGS, "all"), help="which sweep's files to redraw")
    plot.add_argument("--out-dir", default="images", help="folder holding the saved files (default: images)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "sweep")}
    try:
        if args.command == "plot":
            return replot(args.sweep, Path(args.out_dir))
        names = list(SWEEP_CONFIGS) if args.command == "all" else [args.command]
        cfgs = {name: make_config(SWEEP_CONFIGS[name], given) for name in names}
        for cfg in cfgs.values():
            validate(cfg)
    except UsageError as e:
        print(f"sae_phase_transition.py: error: {e}", file=sys.stderr)
        return 2
    try:
        return run_study(cfgs, argv if argv is not None else sys.argv[1:], summary=args.command == "all")
    except KeyboardInterrupt:
        print("\ninterrupted: results of the unfinished sweep were not written; earlier files are untouched",
              file=sys.stderr)
        return 130


def run_study(cfgs: dict, argv, summary: bool) -> int:
    from tqdm import tqdm
    device = resolve_device(next(iter(cfgs.values())).device)
    total = sum(len(BUILD_RUNS[name](cfg)) * cfg.steps for name, cfg in cfgs.items())
    results, metas = {}, {}
    with tqdm(total=total, unit="step", unit_scale=True, desc="training", dynamic_ncols=True,
              file=sys.stderr) as bar:
        for name, cfg in cfgs.items():
            bar.set_description(f"{name}")
            started = time.time()
            tables = csv_roundtrip(run_sweep(name, cfg, progress=bar))
            wall = time.time() - started
            if (tables["runs"].status != "ok").all():
                bar.close()
                print(f"sae_phase_transition.py: error: every {name} run diverged (non-finite parameters); "
                      f"nothing was written. Lower --lr (now {cfg.lr:g}) or --lam.", file=sys.stderr)
                return 1
            res = ANALYSES[name](tables, cfg)
            meta = dict(sweep=name, config=dataclasses.asdict(cfg), command=["sae_phase_transition.py", *argv],
                        script_sha256=script_hash(), versions=versions(), machine=machine(device),
                        device=str(device), wall_time_s=wall, peak_rss_mib=peak_rss_mib(),
                        finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                        n_runs=len(tables["runs"]), run_keys=tables["runs"].key.tolist())
            commit_files(sweep_files(name, cfg, tables, res, meta))
            results[name], metas[name] = res, meta
            bar.clear()
            print_verdict(res)
            print(f"  wrote {Path(cfg.out_dir) / FIGURES[name]}.{{png,csv,json}} ({len(tables['runs'])} runs, "
                  f"{wall:.1f} s)")
    if summary:
        out = Path(next(iter(cfgs.values())).out_dir)
        commit_files({out / "summary.md": summary_markdown(results, metas).encode()})
        print(f"wrote {out / 'summary.md'}")
    return 0


def replot(which: str, out: Path) -> int:
    names = list(SWEEP_CONFIGS) if which == "all" else [which]
    loaded = {name: load_sweep(name, out) for name in names}  # validate everything before writing anything
    results, metas = {}, {}
    for name, (cfg, tables, meta) in loaded.items():
        res = ANALYSES[name](tables, cfg)
        commit_files(sweep_files(name, cfg, tables, res, meta=None))
        results[name], metas[name] = res, meta
        print_verdict(res)
        print(f"  redrew {out / FIGURES[name]}.png from the saved CSV/JSON")
    if which == "all":
        commit_files({out / "summary.md": summary_markdown(results, metas).encode()})
        print(f"wrote {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
