"""DPM-Solver++ 2M for FLUX flow matching (patches/dpm_solver_custom_sigmas.py).

a. Accuracy against an exact ODE: a 2-D Gaussian mixture under rectified flow has a closed-form velocity, so
   both schedulers can be driven through their `step()` API with the *exact* model output, exactly as
   FluxKontextPipeline drives them, and compared with a converged RK4 solution of the same ODE.
b. The upstream bug: stock DPMSolverMultistepScheduler is rejected by the pipeline.
c. Integration: the patched scheduler runs inside FluxKontextPipeline on the tiny model (text-to-image and edit).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift
from PIL import Image

from patches.dpm_solver_custom_sigmas import FlowDPMSolverMultistepScheduler, make_flow_dpm_solver

# FLUX.1-Kontext-dev's scheduler config (model_configs/flux-kontext-dev.json).
EULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096)

# ---------------------------------------------------------------------------------------------------------------
# a. Exact velocity of a Gaussian mixture under FLUX's rectified flow
#    x_sigma = (1 - sigma) x0 + sigma n, n ~ N(0, I); the model predicts v = n - x0; dx/dsigma = v, sigma: 1 -> 0.
# ---------------------------------------------------------------------------------------------------------------
W = np.array([0.3, 0.45, 0.25])  # component weights
MEANS = np.array([[-1.5, 0.0], [1.2, 0.8], [0.3, -1.6]])
STDS = np.array([0.5, 0.6, 0.5])  # isotropic per component; > 0 keeps v smooth up to sigma = 0


def velocity(x: np.ndarray, sigma: float) -> np.ndarray:
    """E[n - x0 | x_sigma = x] for points x of shape (P, 2), in closed form."""
    a = 1.0 - sigma
    var = a * a * STDS**2 + sigma * sigma  # x | k ~ N(a m_k, var_k I)
    d = x[:, None, :] - a * MEANS[None]  # (P, K, 2): x - E[x | k]
    logp = np.log(W) - 0.5 * (d**2).sum(-1) / var - 0.5 * x.shape[1] * np.log(var)
    resp = np.exp(logp - logp.max(1, keepdims=True))
    resp /= resp.sum(1, keepdims=True)  # posterior responsibilities p(k | x)
    # Gaussian conditionals: Cov(x0, x | k) = a s_k^2 I, Cov(n, x | k) = sigma I.
    e_x0 = MEANS[None] + (a * STDS**2 / var)[None, :, None] * d
    e_n = (sigma / var)[None, :, None] * d
    return ((e_n - e_x0) * resp[..., None]).sum(1)


def rk4(x: np.ndarray, n_steps: int) -> np.ndarray:
    """Classical RK4 from sigma = 1 to 0 on a uniform grid (float64)."""
    h = -1.0 / n_steps
    for i in range(n_steps):
        s = 1.0 + i * h
        k1 = velocity(x, s)
        k2 = velocity(x + h / 2 * k1, s + h / 2)
        k3 = velocity(x + h / 2 * k2, s + h / 2)
        k4 = velocity(x + h * k3, s + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def sample_with(scheduler, n_steps: int, mu: float, x1: np.ndarray) -> np.ndarray:
    """Drive `scheduler` exactly as FluxKontextPipeline does, with the exact velocity as the model output."""
    # retrieve_timesteps(...) -> set_timesteps(sigmas=..., device=..., mu=...), then set_begin_index(0).
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n_steps, n_steps), device="cpu", mu=mu)
    scheduler.set_begin_index(0)
    x = torch.from_numpy(x1.copy())
    for i, t in enumerate(scheduler.timesteps):
        v = velocity(x.numpy(), float(scheduler.sigmas[i]))  # the sigma the model sees (t / 1000)
        x = scheduler.step(torch.from_numpy(v), t, x, return_dict=False)[0]
    assert scheduler.sigmas[-1] == 0 and x.dtype == torch.float64
    return x.numpy()


STEPS = (14, 28, 56, 112, 224, 448, 896)
# mu as the pipeline computes it: 256x256 (256 image tokens) and 1024x1024 (4096 tokens, FLUX's default size).
MUS = {f"{n}tok": calculate_shift(n, 256, 4096, 0.5, 1.15) for n in (256, 4096)}


@pytest.fixture(scope="module")
def convergence():
    x1 = np.random.default_rng(0).standard_normal((400, 2))  # start points: pure noise at sigma = 1
    ref = rk4(x1, 1000)
    ref_check = rk4(x1, 500)  # RK4 is 4th order: the 500-vs-1000 gap bounds the reference's own error
    errs = {}
    for mu_name, mu in MUS.items():
        for name, make in (("euler", lambda: FlowMatchEulerDiscreteScheduler(**EULER_CONFIG)),
                           ("dpm", lambda: make_flow_dpm_solver(EULER_CONFIG))):
            sched = make()
            errs[name, mu_name] = np.array(
                [np.sqrt(((sample_with(sched, n, mu, x1) - ref) ** 2).sum(1).mean()) for n in STEPS])  # RMS
    table = "\n".join(f"{k[0]:5s} mu={MUS[k[1]]:.3f}: " + " ".join(f"N={n}:{e:.2e}" for n, e in zip(STEPS, v))
                      for k, v in errs.items())
    print("\nRMS error vs exact ODE endpoint\n" + table)
    return dict(errs=errs, table=table, ref_gap=np.abs(ref - ref_check).max())


def test_reference_is_converged(convergence):
    assert convergence["ref_gap"] < 1e-7


def test_schedules_identical():
    """Same step count -> the very same sigmas and timesteps as the pipeline's Euler scheduler."""
    for mu in MUS.values():
        euler, dpm = FlowMatchEulerDiscreteScheduler(**EULER_CONFIG), make_flow_dpm_solver(EULER_CONFIG)
        for s in (euler, dpm):
            s.set_timesteps(sigmas=np.linspace(1.0, 1 / 14, 14), device="cpu", mu=mu)
        assert torch.equal(euler.sigmas, dpm.sigmas) and torch.equal(euler.timesteps, dpm.timesteps)


@pytest.mark.parametrize("mu_name", MUS)
def test_dpm_beats_euler_at_14_steps(convergence, mu_name):
    e, d = convergence["errs"]["euler", mu_name][0], convergence["errs"]["dpm", mu_name][0]
    assert d < 0.7 * e, convergence["table"]


@pytest.mark.parametrize("mu_name", MUS)
def test_euler_is_first_order(convergence, mu_name):
    ratios = convergence["errs"]["euler", mu_name][:-1] / convergence["errs"]["euler", mu_name][1:]
    assert np.all((ratios > 1.8) & (ratios < 2.2)), (ratios, convergence["table"])


@pytest.mark.parametrize("mu_name", MUS)
def test_dpm_is_second_order(convergence, mu_name):
    # On this schedule (uniform in sigma, from sigma = 1 to 0) the lambda = log((1 - sigma) / sigma) steps next to
    # both ends stay O(1) however large N is, so DPM-Solver++ 2M converges like log(N) / N^2, not cleanly N^-2, and
    # the error changes sign around N = 28..56 (a dip in single ratios). Hence a fitted order over the whole range
    # plus the largest-N doubling ratio, rather than a bound on every doubling ratio.
    err = convergence["errs"]["dpm", mu_name]
    ratios = err[:-1] / err[1:]
    order = -np.polyfit(np.log(STEPS), np.log(err), 1)[0]
    print(mu_name, "dpm doubling ratios", ratios.round(2), "fitted order", round(order, 2))
    assert order > 1.45, (order, convergence["table"])  # Euler: 1.0
    assert ratios[-1] > 3.0, (ratios, convergence["table"])  # Euler: 2.0


def test_first_and_last_steps():
    """sigma_0 = 1 (lambda = -inf) gives an exact Euler step, no NaN; the last step lands on sigma 0 (x - sigma v)."""
    euler, dpm = FlowMatchEulerDiscreteScheduler(**EULER_CONFIG), make_flow_dpm_solver(EULER_CONFIG)
    for s in (euler, dpm):
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), device="cpu", mu=0.8)
        s.set_begin_index(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    tol = dict(rtol=1e-6, atol=1e-6)  # both schedulers round the sample to float32 inside step()
    torch.testing.assert_close(dpm.step(v, dpm.timesteps[0], x).prev_sample,
                               euler.step(v, euler.timesteps[0], x).prev_sample, **tol)
    for t in dpm.timesteps[1:-1]:
        x = dpm.step(torch.randn(3, 8, generator=gen, dtype=torch.float64), t, x).prev_sample
        assert torch.isfinite(x).all()
    v = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    last = dpm.step(v, dpm.timesteps[-1], x).prev_sample
    torch.testing.assert_close(last, x - float(dpm.sigmas[-2]) * v, **tol)
    assert dpm.step_index == len(dpm.timesteps) and dpm.sigmas[dpm.step_index] == 0


# ---------------------------------------------------------------------------------------------------------------
# b + c. Inside FluxKontextPipeline (tiny model)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from kontext_server.models import sources

    return sources.load_model("tiny", "cpu", cache_dir=tmp_path_factory.mktemp("tiny-cache")).pipe


def with_scheduler(pipe, scheduler) -> FluxKontextPipeline:
    """A pipeline sharing `pipe`'s modules with another scheduler (the shared fixture stays untouched)."""
    new = FluxKontextPipeline(**{**pipe.components, "scheduler": scheduler})
    new.set_progress_bar_config(disable=True)
    return new


def generate(pipe, **extra) -> np.ndarray:
    return pipe(prompt="a red car", height=256, width=256, max_area=256 * 256, num_inference_steps=4,
                generator=torch.Generator().manual_seed(0), output_type="np", **extra).images


def test_stock_dpm_solver_rejected_by_pipeline(tiny_pipe):
    stock = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True,
        time_shift_type="exponential", algorithm_type="dpmsolver++", solver_order=2)
    try:
        generate(with_scheduler(tiny_pipe, stock))
    except ValueError as exc:
        assert "custom sigmas" in str(exc)
    else:
        pytest.fail("Stock DPMSolverMultistepScheduler now works inside FluxKontextPipeline: the upstream bug is "
                    "fixed, so patches/dpm_solver_custom_sigmas.py (and this test) can be removed.")


EDIT_IMAGE = Image.fromarray((np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["text-to-image", "edit"])
def test_runs_inside_pipeline(tiny_pipe, mode):
    extra = {} if mode == "text-to-image" else dict(image=EDIT_IMAGE, _auto_resize=False)
    dpm_pipe = with_scheduler(tiny_pipe, make_flow_dpm_solver(dict(tiny_pipe.scheduler.config)))
    euler_pipe = with_scheduler(tiny_pipe, FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config))
    assert isinstance(dpm_pipe.scheduler, FlowDPMSolverMultistepScheduler)

    out, ref = generate(dpm_pipe, **extra), generate(euler_pipe, **extra)
    assert out.shape == ref.shape == (1, 256, 256, 3)
    assert np.isfinite(out).all()
    # Same schedule as Euler, walked to the end (sigma 0), yet a different solver: the outputs must differ.
    assert torch.equal(dpm_pipe.scheduler.sigmas, euler_pipe.scheduler.sigmas)
    assert dpm_pipe.scheduler.step_index == 4
    assert np.abs(out - ref).max() > 1e-4
    # State is reset between calls: a second run gives the same image.
    np.testing.assert_array_equal(generate(dpm_pipe, **extra), out)
