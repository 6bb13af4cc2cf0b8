"""DPM-Solver++ 2M in its flow-matching form, per request (`use_dpm_solver`).

A second-order multistep solver of the same flow ODE that Euler integrates: about half the steps for the same
accuracy, so a request that gives no `steps` runs `default_steps` (14 instead of 28). Uses FLUX's
resolution-dependent shift `mu` and the same sigma schedule as the Euler scheduler. The stock diffusers scheduler
rejects the `sigmas` that FluxKontextPipeline passes: patches/dpm_solver_custom_sigmas.py fixes that.
Lossy (fewer steps): the benchmark reports its fidelity against Euler with the same seed.
"""
from __future__ import annotations

import contextlib

from patches.dpm_solver_custom_sigmas import make_flow_dpm_solver

from optimizations.base import Components, Optimization, RunContext


class DPMSolver(Optimization):
    name, flag, load_time, lossy = "dpm_solver", "use_dpm_solver", False, True

    def __init__(self, default_steps: int = 14):
        self.default_steps = default_steps
        self.scheduler = None

    def prepare(self, components: Components) -> str:
        self.scheduler = make_flow_dpm_solver(dict(components.pipe.scheduler.config))
        return "DPM-Solver++ 2M (flow sigmas, dynamic shift mu)"

    def configure(self, run: RunContext) -> None:
        run.default_steps = self.default_steps
        run.scheduler = "dpm_solver"

    @contextlib.contextmanager
    def activate(self, run: RunContext):
        pipe = run.components.pipe
        euler = pipe.scheduler
        # Plain attribute swap (not register_modules): the pipeline's saved config keeps naming Euler.
        pipe.__dict__["scheduler"] = self.scheduler
        try:
            yield
        finally:
            pipe.__dict__["scheduler"] = euler
