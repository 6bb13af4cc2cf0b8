"""The built-in benchmark: the same FluxService and registry as serving, timed per stage.

requests.py (GET /benchmark, the CLI's main job: flags off vs default vs all), stages.py (the stage table),
timing.py (warm-up, medians, clocks), floor.py (the floor model), fidelity.py, report.py (markdown, chart),
gpu_clocks.py (nvidia-smi sampling), workloads.py (shared by the profiling tools). Protocol: docs/benchmarking.md.
"""
