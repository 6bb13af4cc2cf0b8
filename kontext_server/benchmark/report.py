"""A benchmark result as a markdown table and a stacked bar chart (matplotlib, imported only when drawing)."""
from __future__ import annotations

import numpy as np


LEGEND = """Columns: times in ms of the timed run with the median total (its stages add up to its total; glue is
the rest: scheduler, latent packing, pre- and post-processing); total (min-max) over the timed runs. x stage 0 and
x prev: end-to-end speed-up (higher is faster), marked (noise) when the two rows' min-max ranges overlap, and given
per step too when the rows ran different step counts. steps comp/skip: transformer evaluations run / skipped by the
step cache (@ its threshold). cold start: compile or capture before the timed runs, never in total. floor ratio: the
step over the floor model's time (GPU only). fidelity vs 0: against row 0's output with the same seed; a cache row
(1c, 5c) also against its row without the cache ("vs 5 (uncached)"). On random weights (synthetic-full) the cache's
skips and fidelity say nothing about real weights: they show the mechanism and its cost."""


def _ratio(r: dict, key: str, noise_key: str) -> str:
    if key not in r:
        return "-"
    return f"{r[key]} (noise)" if r.get(noise_key) else str(r[key])


def header(result: dict) -> str:
    """One line saying what ran where."""
    w = result.get("workload")
    if isinstance(w, dict):  # the request benchmark
        kind = "edit" if w["edit"] else "text-to-image"
        what = f"request benchmark: {w['width']}x{w['height']} {kind}, {w['steps']} steps, {w['runs']} timed runs each"
    else:
        what = f"stage table: {w}"
    cp = result.get("context_parallel")
    where = f"{result['device']}" + (f" x {cp['degree']} (context parallel: Ulysses {cp['ulysses']} x ring "
                                     f"{cp['ring']})" if cp else "")
    return f"{what} | model {result['model']} | device {where} | torch {result['torch']}"


def to_markdown(result: dict) -> str:
    head = ("| stage | what | text enc | img enc | transformer (per step) | VAE dec | glue | total (min-max) | "
            "x stage 0 | x prev | steps comp/skip | peak GiB | cold start | floor ratio | SM MHz, W | fidelity vs 0 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        t = r["timings_ms"]
        fid = dict(r.get("fidelity_vs_stage0") or {})
        if r.get("step_rel_error_vs_stage0"):
            fid = {"step_rel_err": r["step_rel_error_vs_stage0"], **fid}
        fid_s = ", ".join(f"{k}={v}" for k, v in fid.items()) or "-"
        uncached = dict(r.get("fidelity_vs_uncached") or {})
        if uncached:
            stage = uncached.pop("stage")
            fid_s += f"; vs {stage} (uncached): " + (", ".join(f"{k}={v}" for k, v in uncached.items()) or "-")
        steps = f"{r['steps_computed']}/{r['steps_skipped']}"
        if r.get("cache_threshold") is not None:
            steps += f" @{r['cache_threshold']:g}"
        lines.append(
            f"| {r['stage']} | {r['label']} | {t['text_encode']:.1f} | {t['image_encode']:.1f} | "
            f"{t['transformer']:.1f} ({t['transformer_per_step']:.1f}) | {t['vae_decode']:.1f} | {t['glue']:.1f} | "
            f"{t['total']:.1f} ({r['total_min_ms']:.0f}-{r['total_max_ms']:.0f}) | {_x_stage0(r)} | "
            f"{_ratio(r, 'speedup_vs_previous', 'within_noise_vs_previous')} | "
            f"{steps} | "
            f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-'} | {r['cold_start_ms']:.0f} ms | "
            f"{r.get('floor_ratio', '-')} | {clocks_cell(r.get('gpu_clocks'))} | {fid_s} |")
    if any("scaling" in r for r in result["rows"]):
        lines[0] += " x 1 GPU: step / total (efficiency) |"
        lines[1] += "---|"
        for i, r in enumerate(result["rows"], start=2):
            sc = r.get("scaling")
            lines[i] += (f" {sc['step']} / {sc['total']} ({sc['efficiency']}) |" if sc else " - |")
        lines.append("\nx 1 GPU: this row split over the ranks against the same row on rank 0 alone (the sequence not "
                     "split, same loaded model): speed-up per transformer step and end to end; efficiency = the step "
                     "speed-up / the number of ranks.")
    lines.append("\n" + LEGEND)
    if result.get("code_switches"):  # an A/B run: say so under its table
        lines.append("\nswitches: " + ", ".join(f"{k}={v}" for k, v in result["code_switches"].items()))
    regions = result.get("compiled_regions") or {}
    if regions.get("compiled") or regions.get("loaded") or regions.get("notes"):
        lines.append(f"\nsaved compiled regions: {regions.get('compiled', 0)} compiled, {regions.get('loaded', 0)} "
                     f"loaded, {regions.get('to_dynamo', 0)} left to dynamo"
                     + "".join(f"\n- {n}" for n in regions.get("notes", [])))
    return "\n".join(lines)


def _x_stage0(r: dict) -> str:
    cell = _ratio(r, "speedup_vs_stage0", "within_noise_vs_stage0")
    if "per_step_speedup_vs_stage0" in r:
        cell += f"; per step {r['per_step_speedup_vs_stage0']}"
    return cell


def clocks_cell(clocks: dict | None) -> str:
    """The timed runs' median SM clock and power draw, e.g. "1605, 690"; "-" where nothing was sampled."""
    if not clocks or "sm_mhz" not in clocks:
        return "-"
    power = clocks.get("power_w")
    return f"{clocks['sm_mhz']['median']:.0f}, {power['median']:.0f}" if power else f"{clocks['sm_mhz']['median']:.0f}"


def bar_chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["stage"] for r in rows]
    parts = ["text_encode", "image_encode", "transformer", "vae_decode", "glue"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = np.zeros(len(rows))
    for p in parts:
        vals = np.array([r["timings_ms"][p] for r in rows])
        ax.bar(labels, vals, bottom=bottom, label=p)
        bottom += vals
    ax.set_ylabel("ms (median)")
    ax.set_title(f"{result.get('workload', 'benchmark')} on {result['device']} ({result['model']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
