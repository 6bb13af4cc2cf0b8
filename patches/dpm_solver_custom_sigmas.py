"""DPM-Solver++ 2M for FLUX flow matching, usable inside `diffusers.FluxKontextPipeline`.

Upstream bug (diffusers 0.42.1)
-------------------------------
`FluxKontextPipeline.__call__` always sets up its schedule with

    retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=np.linspace(1.0, 1/N, N), mu=mu)

and `retrieve_timesteps` raises ``ValueError("... does not support custom sigmas schedules ...")`` when
`scheduler.set_timesteps` has no `sigmas` parameter. `DPMSolverMultistepScheduler.set_timesteps(num_inference_steps,
device, mu, timesteps)` has none, so DPM-Solver cannot be used in the FLUX pipelines even though the scheduler
itself supports flow matching (`use_flow_sigmas=True`, `prediction_type="flow_prediction"`).

The fix
-------
`FlowDPMSolverMultistepScheduler.set_timesteps` also accepts `sigmas`. Given flow sigmas in (0, 1] (descending) it
applies FLUX's resolution-dependent shift exactly as `FlowMatchEulerDiscreteScheduler` does (same float32 rounding,
so both schedulers step through bit-identical sigmas for the same step count), appends the final sigma 0, sets
float timesteps = sigma * num_train_timesteps and resets the multistep state the way the parent does. Without
`sigmas` it defers to the parent unchanged. Stepping (`step`, `set_begin_index`, the DPM-Solver++ updates) is
the parent's own code.

Notes on the parent's step behaviour with this schedule (checked in tests/optimizations/test_dpm_solver.py):
- sigma_0 = 1 means alpha_0 = 0 and lambda_0 = -inf; the parent's formulas degrade gracefully there (the first
  update is exactly an Euler step and the second one's D1 term is multiplied by 1/r0 = 0), so the first two steps
  are first order and the rest second order. No NaNs.
- With `final_sigmas_type="zero"` the last step is always first order and returns the data prediction
  x - sigma * v, i.e. it lands exactly on sigma 0, the same last step Euler takes.
- Timesteps are kept as float32 (the parent casts to int64): the pipeline feeds `t / 1000` to the transformer,
  and truncating would give the model a timestep that does not match the sigma the solver uses.

Remove this module once `DPMSolverMultistepScheduler.set_timesteps` accepts `sigmas` upstream
(tests/optimizations/test_dpm_solver.py::test_stock_dpm_solver_rejected_by_pipeline starts failing then).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler


class FlowDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """`DPMSolverMultistepScheduler` whose `set_timesteps` takes FLUX-style custom flow `sigmas` (+ `mu`)."""

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
        sigmas: list[float] | np.ndarray | None = None,
    ):
        if sigmas is None:
            return super().set_timesteps(num_inference_steps, device, mu=mu, timesteps=timesteps)

        if timesteps is not None:
            raise ValueError("Pass only one of `sigmas` or `timesteps`.")
        if not self.config.use_flow_sigmas:
            raise ValueError("Custom `sigmas` are supported only for flow matching (`use_flow_sigmas=True`).")
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError("`sigmas` must have length `num_inference_steps`.")

        # Same dtype handling and shift as FlowMatchEulerDiscreteScheduler.set_timesteps (float32 numpy).
        sigmas = np.asarray(sigmas).astype(np.float32)
        if self.config.use_dynamic_shifting:
            if mu is None:
                raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
            if self.config.time_shift_type != "exponential":
                raise ValueError(f"Unsupported time_shift_type {self.config.time_shift_type!r}")
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            shift = self.config.flow_shift
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)

        sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        # Float timesteps (not int64 like the parent): the transformer receives t / 1000 and must see the exact sigma.
        self.timesteps = (sigmas * self.config.num_train_timesteps).to(device=device)
        if self.config.final_sigmas_type == "zero":
            sigma_last = 0.0
        else:  # "sigma_min" means the last training sigma, which has no meaning on the flow schedule
            raise ValueError("Custom flow `sigmas` need `final_sigmas_type='zero'`.")
        self.sigmas = torch.cat([sigmas, torch.tensor([sigma_last])])  # kept on CPU, as the parent does
        self.num_inference_steps = len(sigmas)

        # Reset the multistep state exactly like the parent.
        self.model_outputs = [None] * self.config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None


def make_flow_dpm_solver(euler_config: dict) -> FlowDPMSolverMultistepScheduler:
    """DPM-Solver++ 2M with the FLUX shift settings of a `FlowMatchEulerDiscreteScheduler` config."""
    if euler_config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError("DPMSolverMultistepScheduler supports only the exponential time shift")
    keys = ("num_train_timesteps", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
    copied = {k: euler_config[k] for k in keys if k in euler_config}
    # The pipeline reads these four from the scheduler config to compute mu; DPM's __init__ does not take them,
    # so register_to_config below keeps them on the config (otherwise the pipeline silently uses its defaults).
    shift_keys = {k: copied.pop(k) for k in keys[1:] if k in copied}
    sched = FlowDPMSolverMultistepScheduler(
        **copied,
        solver_order=2,
        algorithm_type="dpmsolver++",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=euler_config.get("shift", 1.0),
        use_dynamic_shifting=euler_config.get("use_dynamic_shifting", True),
        time_shift_type="exponential",
        final_sigmas_type="zero",
        lower_order_final=True,
    )
    sched.register_to_config(**shift_keys)
    return sched
