"""Pure functions against known answers, and the batched trainer against one-run references."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import sae_phase_transition as S


def run(**kw):
    base = dict(n=300, p=0.1, m=40, k=20, d=10, lam=0.5, seed=0, data_seed=0)
    return S.Run(**{**base, **kw})


# --- data -------------------------------------------------------------------------------------------

def test_dictionary_columns_are_unit_vectors():
    w = S.make_dictionary(10, 20, S.generator(0, "x"))
    assert w.shape == (10, 20)
    assert torch.allclose(w.norm(dim=0), torch.ones(20), atol=1e-6)


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 1.0])
def test_codes_active_fraction_and_sign(p):
    c = S.sample_codes(20000, 20, p, S.generator(1, p))
    frac = (c > 0).float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / c.numel()) + 1e-9
    assert (c >= 0).all()
    # half-normal magnitudes: E|N(0,1)| = sqrt(2/pi)
    assert abs(c[c > 0].mean().item() - math.sqrt(2 / math.pi)) < 0.02


def test_run_data_is_reproducible_and_keyed():
    a, b = S.run_data(run(), 0, 64), S.run_data(run(), 0, 64)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other_seed = S.run_data(run(data_seed=1), 0, 64)
    assert not torch.equal(a[1], other_seed[1])
    # the dictionary does not depend on N or p, and x = W* c lies in its span
    w2 = S.run_data(run(n=50, p=0.3), 0, 64)[0]
    assert torch.equal(a[0], w2)
    coef = torch.linalg.lstsq(a[0], a[1].T).solution
    assert torch.allclose(a[0] @ coef, a[1].T, atol=1e-4)


# --- penalties --------------------------------------------------------------------------------------

def test_huber_moreau_known_values():
    z = torch.tensor([0.0, 0.05, 0.1, 2.0])
    assert torch.allclose(S.penalty(z, 0.1), torch.tensor([0.0, 0.0125, 0.05, 1.95]))
    assert torch.allclose(S.penalty_grad(z, 0.1), torch.tensor([0.0, 0.5, 1.0, 1.0]))


def test_huber_torch_convention_is_delta_times_moreau_and_matches_torch_loss():
    z = torch.linspace(0, 3, 31)
    for delta in (1.0, 0.3, 0.01):
        ours = S.penalty(z, delta, scale=delta)
        assert torch.allclose(ours, delta * S.penalty(z, delta))
        lib = torch.nn.HuberLoss(reduction="none", delta=delta)(z, torch.zeros_like(z))
        assert torch.allclose(ours, lib, atol=1e-6)


def test_huber_is_continuous_with_slope_one_above_delta_and_tends_to_l1():
    delta = 0.2
    below, above = S.penalty(torch.tensor(delta - 1e-6), delta), S.penalty(torch.tensor(delta + 1e-6), delta)
    assert abs(below - above) < 1e-5
    z = torch.tensor([0.5, 1.0, 4.0], requires_grad=True)
    S.penalty(z, delta).sum().backward()
    assert torch.allclose(z.grad, torch.ones(3))
    z = torch.linspace(0, 2, 101)
    gaps = [(S.penalty(z, d) - z.abs()).abs().max().item() for d in (1e-1, 1e-2, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] <= 1e-3 / 2 + 1e-7  # max gap is delta / 2
    assert torch.equal(S.penalty(z, 0.0), z)  # delta = 0 is exactly L1


def test_hand_gradients_match_autograd():
    runs = [run(), run(penalty="huber", delta=0.1, lam=0.3, seed=1),
            run(penalty="huber", delta=0.01, convention="torch", lam=0.7, seed=2)]
    for weighted in (True, False):
        for subset in (runs[:1], runs):
            g = torch.Generator().manual_seed(0)
            shapes = [t.shape for t in S.init_population(subset, S.PhaseConfig(), "cpu").tensors()]
            leaves = [(torch.randn(s, generator=g) * 0.5).requires_grad_(True) for s in shapes]
            pop = S.Population.from_parts(*leaves)
            pen = S.PenaltySpec.of(subset, "cpu")
            x = torch.randn(len(subset), 64, 10, generator=g)
            S.objective(pop, x, pen, weighted).sum().backward()
            hand = S.gradients(S.Population.from_parts(*(t.detach() for t in leaves)), x, pen, weighted)
            for leaf, h in zip(leaves, hand):
                assert torch.allclose(leaf.grad, h, rtol=1e-4, atol=1e-6)


def test_population_views_share_one_flat_buffer():
    pop = S.init_population([run(), run(seed=1, m=40)], S.PhaseConfig(), "cpu")
    pop.flat.zero_()
    assert all((t == 0).all() for t in pop.tensors())
    pop.w_dec[1, 2, 3] = 7.0
    assert (pop.flat == 7.0).sum() == 1 and pop.flat[1].tolist().count(7.0) == 1


def test_adam_matches_torch_optim_adam():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 50, generator=g)
    ours, ref = start.clone(), start.clone().requires_grad_(True)
    opt_ours, opt_ref = S.Adam(ours, lr=3e-3), torch.optim.Adam([ref], lr=3e-3, foreach=False)
    for _ in range(25):
        grad = torch.randn(3, 50, generator=g)
        opt_ours.step(grad)
        ref.grad = grad.clone()
        opt_ref.step()
    assert torch.allclose(ours, ref.detach(), atol=1e-7, rtol=0)


# --- metrics ----------------------------------------------------------------------------------------

def planted(d=10, k=20, seed=0):
    return S.make_dictionary(d, k, S.generator(seed, "planted")).T  # (K, d) true features as rows


def test_recovery_of_planted_dictionary_with_sign_flips_and_extra_columns():
    truth = planted()
    signs = torch.where(torch.arange(20) % 2 == 0, 1.0, -1.0).unsqueeze(1)
    extra = torch.randn(15, 10, generator=torch.Generator().manual_seed(3))
    w_dec = torch.cat([extra[:7], 2.5 * signs * truth, extra[7:]])[torch.randperm(35)]
    cos = S.cosine_matrix(w_dec[None], truth[None])
    assert S.recovery_rate(cos, torch.tensor([20]), 0.9).item() == 1.0
    assert S.mcc(cos[0].numpy(), 20) == pytest.approx(1.0, abs=1e-6)


def test_recovery_zero_for_orthogonal_complement():
    truth = torch.eye(10)[:4] @ torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    q = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    complement = torch.eye(10)[4:] @ q  # rows orthogonal to every true feature
    cos = S.cosine_matrix(complement[None], truth[None])
    assert cos.max().item() < 1e-5
    assert S.recovery_rate(cos, torch.tensor([4]), 0.9).item() == 0.0


def test_recovery_ignores_padding_beyond_k():
    cos = torch.zeros(1, 3, 4)
    cos[0, 0, 0] = cos[0, 1, 1] = 0.95
    cos[0, 2, 3] = 0.99  # a padded feature (K = 2) must not count
    assert S.recovery_rate(cos, torch.tensor([2]), 0.9).item() == 1.0
    assert S.recovery_rate(cos, torch.tensor([3]), 0.9).item() == pytest.approx(2 / 3)


def test_mcc_hand_worked_case():
    # Greedy would take row 0 for feature 0 (0.9) and leave row 1 with 0.1 for feature 1: mean 0.5.
    # The one-to-one optimum is rows (0->1, 1->0): (0.8 + 0.7) / 2 = 0.75.
    cos = np.array([[0.9, 0.8], [0.7, 0.1]])
    assert S.mcc(cos, 2) == pytest.approx(0.75)
    # more features than latents: the unmatched one counts as 0
    assert S.mcc(np.array([[0.6, 0.9, 0.2]]), 3) == pytest.approx(0.3)


def test_cs_threshold_known_values():
    assert S.cs_threshold(0.5, 2) * 0.5 == pytest.approx(0.193, abs=1e-3)
    assert S.cs_threshold(0.5, 1) * 0.5 == pytest.approx(0.279, abs=1e-3)
    # more measurements per unknown -> a higher threshold
    assert S.cs_threshold(0.8, 2) > S.cs_threshold(0.5, 2)


def test_compare_identical_and_separated_samples():
    same = S.compare([0.9, 0.95, 1.0, 0.85] * 3, [0.9, 0.95, 1.0, 0.85] * 3)
    assert same["p"] == 1.0 and same["diff"] == 0.0
    constant = S.compare([1.0] * 10, [1.0] * 10)
    assert constant["p"] == 1.0
    sep = S.compare(np.linspace(0.9, 1.0, 10), np.linspace(0.1, 0.2, 10))
    assert sep["p"] < 1e-3 and sep["diff"] < 0 and sep["effect"] == pytest.approx(-1.0)


def test_holm_known_answer():
    assert S.holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_loglog_slope_recovers_power_law():
    m = np.array([10, 20, 40, 80, 160.0])
    fit = S.loglog_slope(m, 3 * m ** -0.5 * np.exp([0.01, -0.02, 0.0, 0.02, -0.01]))
    assert fit["lo"] < -0.5 < fit["hi"] and fit["slope"] == pytest.approx(-0.5, abs=0.05)


# --- the population trainer ---------------------------------------------------------------------------

def mixed_population():
    return [run(), run(n=1000, p=0.2, seed=1, data_seed=1), run(n=100, lam=0.3, seed=2),
            run(penalty="huber", delta=0.01, seed=3), run(penalty="huber", delta=0.1, convention="torch", n=500),
            run(m=20, k=30, seed=4), run(m=80, k=10, n=700)]


@pytest.mark.parametrize("decoder_norm", ["weighted", "project"])
def test_member_alone_equals_member_in_mixed_population(decoder_norm):
    cfg = S.PhaseConfig(steps=8, n_eval=256, decoder_norm=decoder_norm)
    runs = mixed_population()
    together = S.train_population(runs, cfg)
    for r, res in zip(runs, together):
        alone = S.train_population([r], cfg)[0]
        for a, b in zip(res["params"], alone["params"]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_final_metrics_do_not_depend_on_population_or_chunking():
    cfg = S.PhaseConfig(steps=150, n_eval=256)
    runs = mixed_population()
    together = S.train_population(runs, cfg)
    tiny_chunks = S.train_population(runs, dataclasses.replace(cfg, max_memory=0.01))  # one run per chunk
    assert len(S.plan_chunks(runs, dataclasses.replace(cfg, max_memory=0.01))) == len(runs)
    for a, b in zip(together, tiny_chunks):
        for metric in ("recovery", "mcc", "mmcs", "l0", "dead"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-5)


def test_gd_step_equals_hand_computed_gradient_step():
    cfg = S.PhaseConfig(steps=1, optimizer="gd", lr=0.05, n_eval=64)
    r = run(penalty="huber", delta=0.05)
    trained = S.train_population([r], cfg)[0]["params"]
    _, x, _ = S.run_data(r, cfg.seed, cfg.n_eval)
    idx = torch.randint(r.n, (S.STREAM_STEPS, cfg.batch_size), generator=S.batch_generator(r, cfg.seed))[0]
    leaves = [t.clone().requires_grad_(True) for t in S.init_population([r], cfg, "cpu").tensors()]
    S.objective(S.Population.from_parts(*leaves), x[idx][None], S.PenaltySpec.of([r], "cpu"),
                weighted=True).sum().backward()
    for t, after in zip(leaves, trained):
        assert torch.allclose(after, (t - cfg.lr * t.grad)[0].detach(), atol=1e-6)


def test_gradient_clipping_bounds_each_runs_step():
    cfg = S.PhaseConfig(steps=1, optimizer="gd", lr=0.1, n_eval=64, clip_grad=1e-3)
    runs = [run(), run(seed=1, n=500)]
    before = S.init_population(runs, cfg, "cpu").flat
    after = torch.stack([torch.cat([t.flatten() for t in res["params"]]) for res in S.train_population(runs, cfg)])
    step = (after - before).norm(dim=1)
    assert torch.allclose(step, torch.full((2,), cfg.lr * cfg.clip_grad), rtol=1e-3)


def test_full_batch_gd_is_gradient_descent_on_the_empirical_risk():
    cfg = S.PhaseConfig(steps=3, optimizer="gd", lr=0.05, n_eval=64, batch_size=0)
    runs = [run(n=150), run(n=150, p=0.3, seed=1), run(n=400, seed=2)]  # two chunks: full batch groups by N
    assert sorted(map(len, S.plan_chunks(runs, cfg))) == [1, 2]
    trained = S.train_population(runs, cfg)
    for r, res in zip(runs, trained):
        _, x, _ = S.run_data(r, cfg.seed, cfg.n_eval)
        leaves = [t.clone() for t in S.init_population([r], cfg, "cpu").tensors()]
        for _ in range(cfg.steps):
            leaves = [t.detach().requires_grad_(True) for t in leaves]
            S.objective(S.Population.from_parts(*leaves), x[None], S.PenaltySpec.of([r], "cpu"),
                        weighted=True).sum().backward()
            leaves = [t - cfg.lr * t.grad for t in leaves]
        for expected, got in zip(leaves, res["params"]):
            assert torch.allclose(expected[0].detach(), got, atol=1e-5)


def test_langevin_noise_has_variance_2_eta_tau():
    base = S.PhaseConfig(steps=1, optimizer="gd", lr=0.01, n_eval=64, width=160)
    tau = 0.5
    r = run(m=160)
    cold = S.train_population([r], base)[0]["params"]
    hot = S.train_population([r], dataclasses.replace(base, temperature=tau))[0]["params"]
    diff = torch.cat([(h - c).flatten() for h, c in zip(hot, cold)])
    n = diff.numel()  # 3370 parameters: the variance estimate has relative sd sqrt(2/n) ~ 2.4%
    assert diff.var().item() == pytest.approx(2 * base.lr * tau, rel=5 * math.sqrt(2 / n))
    assert abs(diff.mean().item()) < 5 * math.sqrt(2 * base.lr * tau / n)


def test_divergent_member_is_marked_failed_without_touching_others():
    cfg = S.PhaseConfig(steps=100, optimizer="gd", lr=1.0, n_eval=64)
    runs = [run(p=0.02, n=200), run(p=1.0, n=200)]
    res = S.train_population(runs, cfg)
    assert res[0]["failed_step"] is None and math.isfinite(res[0]["recovery"])
    assert res[1]["failed_step"] is not None and 0 < res[1]["failed_step"] <= cfg.steps
    alone = S.train_population(runs[:1], cfg)[0]
    assert alone["recovery"] == res[0]["recovery"]
    table = S.tabulate("phase", runs, res)["runs"]
    assert table.status.tolist() == ["ok", "failed"] and math.isnan(table.recovery[1])


def test_checkpoint_steps_are_log_spaced_and_end_at_steps():
    steps = S.checkpoint_steps(3000, 10)
    assert steps[0] == 1 and steps[-1] == 3000 and len(steps) == 10
    assert all(b / a > 1.5 for a, b in zip(steps, steps[1:]))


def test_runs_differing_only_in_penalty_are_paired_and_tiny_delta_huber_tracks_l1():
    cfg = S.PhaseConfig(steps=60, n_eval=128)
    l1, huber = run(), run(penalty="huber", delta=1e-7)
    a, b = S.train_population([l1, huber], cfg)
    first = S.init_population([l1, huber], cfg, "cpu")
    assert torch.equal(first.flat[0], first.flat[1])  # the same initialisation
    far = S.train_population([run(penalty="huber", delta=1.0)], cfg)[0]
    gap = lambda u, v: max((x - y).abs().max().item() for x, y in zip(u["params"], v["params"]))
    assert gap(a, b) < 1e-3 and gap(a, b) < gap(a, far) / 50
