"""What a benchmark run leaves behind: the table it prints, the JSON of every number, the plot."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

CONVENTIONS = {
    "flops": "useful FLOPs of the visible work (docs/performance.md)",
    "time": "median over rounds; each round times every implementation once, in rotating order",
    "peak_bytes": "GPU: torch.cuda.max_memory_allocated over one call after reset_peak_memory_stats (inputs "
                  "included); CPU: peak bytes allocated by torch's CPU allocator during one call (profiler memory "
                  "events; inputs excluded)",
    "saved_bytes": "bytes saved for backward (saved_tensors_hooks, distinct storages, inputs and parameters "
                   "excluded); fwd+bwd only",
    "ratio_to_best_peer": "best peer median / this median (> 1: faster than every peer)",
    "fraction_of_matmul": "useful FLOP/s over torch's matrix product rate in the case's dtype, measured in the same "
                          "run (ceilings)",
    "fraction_of_bandwidth": "bytes moved per second over the memory bandwidth measured in the same run",
}


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_ceilings(ceilings: dict, device: torch.device) -> str:
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    return (f"ceilings measured now: matmul float32 {ceilings['matmul_float32_flop_per_s'] / scale:.1f} {unit}, "
            f"bfloat16 {ceilings['matmul_bfloat16_flop_per_s'] / scale:.1f} {unit}; memory "
            f"{ceilings['memory_bytes_per_s'] / 1e9:.1f} GB/s")


def format_table(records: list[dict], device: torch.device, flops_note: Optional[str] = None) -> str:
    gpu = device.type == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    with_bytes = any(r.get("bytes_per_s") for r in records)
    header = ["operation", "mode", "shape", "dtype", "implementation", "median ms",
              "GB/s" if with_bytes else unit, "% ceiling", "peak MiB", "saved MiB", "vs best peer"]
    rows, previous = [], None
    for r in records:
        if r.get("status") != "ok":
            continue
        if previous is not None and r["case"] != previous:
            rows.append(None)
        previous = r["case"]
        ratio = r.get("ratio_to_best_peer")
        ratio_s = "-" if ratio is None else f"{ratio:.2f}x" + ("*" if r["impl"] == r.get("best_peer") else "")
        if r.get("agrees") is False:
            ratio_s += f" MISMATCH {r['rel_err']:.1e}"
        if with_bytes:
            rate = f"{r['bytes_per_s'] / 1e9:.1f}" if r.get("bytes_per_s") else "-"
            frac = r.get("fraction_of_bandwidth")
        else:
            rate = f"{r['flop_per_s'] / scale:.1f}" if r.get("flop_per_s") else "-"
            frac = r.get("fraction_of_matmul")
        rows.append([r["op"], r["mode"], r["shape"], r["dtype"], r["impl"], f"{r['median_ms']:.2f}", rate,
                     "-" if frac is None else f"{100 * frac:.0f}%", _mib(r.get("peak_bytes")),
                     _mib(r.get("saved_bytes")), ratio_s])
    widths = [max([len(h)] + [len(row[i]) for row in rows if row]) for i, h in enumerate(header)]
    right = {5, 6, 7, 8, 9}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += ["" if row is None else fmt(row) for row in rows]
    skipped: dict = {}
    for r in records:
        if r.get("status") in ("skipped", "failed"):
            skipped.setdefault((r["impl"], r["status"], r["reason"]), []).append(r["case"])
    if skipped:
        lines += ["", "not measured:"]
        for (impl, status, reason), ids in skipped.items():
            lines.append(f"  {impl} ({status}, {len(ids)} case{'s' if len(ids) > 1 else ''}): {reason}")
    rate_note = ("GB/s: bytes moved / median time" if with_bytes else
                 f"{unit}: useful FLOPs ({flops_note or 'visible pairs; fwd+bwd = 3.5x fwd'}) / median time")
    lines += ["", rate_note + "; % ceiling: of the rate measured in this run (above the table).",
              "vs best peer: best peer's time / this time (* = the best peer).",
              "peak MiB: " + ("torch.cuda.max_memory_allocated over one call (inputs included)." if gpu else
                              "peak bytes allocated by torch's CPU allocator during one call (inputs excluded)."),
              "saved MiB: bytes saved for backward (saved_tensors_hooks), inputs and parameters excluded."]
    return "\n".join(lines)


def format_summary(summary: dict, indent: str = "") -> str:
    lines = []
    rows = summary.get("rows") if not indent else None
    if rows and all("label" in v for v in rows.values()):  # whole models: tokens per second, the ratio
        names = sorted({n for v in rows.values() for n in v["tokens_per_s"]})
        lines.append(f"{'ratio':>7}  " + "  ".join(f"{n + ' tok/s':>16}" for n in names) + "  row")
        for v in rows.values():
            ratio = f"{v['ratio_vs_sdpa']:6.2f}x" if v.get("ratio_vs_sdpa") is not None else "      -"
            rates = "  ".join(f"{v['tokens_per_s'][n]:16.1f}" if n in v["tokens_per_s"] else f"{'-':>16}"
                              for n in names)
            lines.append(f"{ratio}  {rates}  {v['label']} (vs {v.get('vs', '-')})")
    elif rows:  # the models' table: one line a row
        lines.append(f"{'ours / SDPA fastest call':>26}  {'% bw':>5}  row (SDPA's call)")
        for case, v in rows.items():
            bw = v.get("kv_fraction_of_bandwidth")
            bw_s = f"{100 * bw:4.0f}%" if bw is not None and "decode" in v["phase"] else "    -"
            lines.append(f"{v['ratio_vs_sdpa']:>25.2f}x  {bw_s}  {v['phase']} {v['mode']} {v['dtype']} "
                         f"{case.split('-N')[-1]} ({v['sdpa_call']})")
    for key, value in summary.items():
        if key == "rows" and rows:
            continue
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.append(format_summary(value, indent + "  "))
        elif isinstance(value, float):
            lines.append(f"{indent}{key}: {value:.3g}")
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


def write(op, records: list, env: dict, args: dict, summary: Optional[dict], stem: Path, *,
          plot: bool = True) -> tuple[list, Optional[str]]:
    """Writes ``stem.json`` and (with matplotlib) ``stem.png``; returns (files, a note when a plot was
    skipped)."""
    doc = {"operation": op.name, **env, "args": args, "sweep_name": records[0].get("sweep_name") if records else None,
           "conventions": {**CONVENTIONS, "flops": f"{CONVENTIONS['flops']}; {op.name}: {op.flops_note}"},
           "summary": summary, "results": records}
    files = [stem.with_suffix(".json")]
    files[0].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    if not plot or not records:
        return files, None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return files, "plots skipped: matplotlib is not installed (pip install matplotlib, or longkernels[bench])"
    title = f"{op.name} on {env['device']} ({env['threads']} threads, torch {env['torch']})"
    curves = [r for r in records if r.get("variant") not in ("models", "hf")]  # the models' rows are no sweep
    if curves:
        path = stem.with_suffix(".png")
        draw(curves, path, title, curves[0].get("sweep_name") or "size", saved=op.plot_saved_bytes)
        files.append(path)
    if summary and summary.get("rows"):
        path = stem.parent / f"{stem.name}-ratios.png"
        draw_ratios(summary, path, title)
        files.append(path)
    return files, None


def draw_ratios(summary: dict, path: Path, title: str) -> None:
    """Horizontal bars of SDPA's fastest call's time over ours, one per row of the models' table, with the
    line at 1 (above: faster) and the geometric means in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary["rows"].items(), key=lambda kv: (kv[1]["mode"], kv[1]["phase"], kv[1]["dtype"], kv[0]))
    rows = [(k, v) for k, v in rows if v.get("ratio_vs_sdpa") is not None]
    labels = [v.get("label") or f"{v['phase']} {v['mode']} {v['dtype']} ({k.split('-N')[-1].replace('-M', ' M')})"
              for k, v in rows]
    ratios = [v["ratio_vs_sdpa"] for _, v in rows]
    colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
    ax.barh(range(len(rows)), ratios, color=colors)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel(summary.get("ratio_label", "SDPA's fastest call's time / ours") + " (log scale; > 1: faster)")
    means = ", ".join(f"{m} geomean {summary[f'{m}_geomean_vs_sdpa']:.2f}x" for m in ("fwd", "fwdbwd")
                      if f"{m}_geomean_vs_sdpa" in summary)
    ax.set_title(f"{title}\n{summary.get('implementation', '')}: {summary.get('headline') or means}", fontsize=9)
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(records: list[dict], path: Path, title: str, sweep_name: str, *, saved: bool = False) -> None:
    """Time against the sweep, one panel per (mode, dtype), one colour per implementation (peers dashed);
    with ``saved`` a second row of bytes saved for backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r.get("status") == "ok"]
    panels = sorted({(r["mode"], r["dtype"]) for r in ok})
    if not panels:
        return
    # Curves for the variants measured at several sizes; single-size variants are in the table.
    sizes = {}
    for r in ok:
        sizes.setdefault(r["variant"], set()).add(r["sweep"])
    curved = {v for v, s in sizes.items() if len(s) > 1} or set(sizes)
    names = sorted({r["impl"] for r in ok})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {n: palette[i % len(palette)] for i, n in enumerate(names)}
    styles = ["o", "s", "^", "D", "v"]
    markers = {v: styles[i % len(styles)] for i, v in enumerate(sorted(curved))}
    metrics = [("median_ms", "median time (ms)", 1.0)] + ([("saved_bytes", "saved for backward (MiB)", 2**-20)]
                                                          if saved else [])
    cols = min(2, len(panels)) if not saved else len(panels)
    grid_rows = math.ceil(len(panels) / cols) * len(metrics)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(6.5 * cols, 4.5 * grid_rows), squeeze=False)
    flat = list(axes.flat)
    k = 0
    for key, label, scale in metrics:
        for mode, dtype in panels:
            ax = flat[k]
            k += 1
            series = {}
            for r in ok:
                if r["mode"] == mode and r["dtype"] == dtype and r["variant"] in curved and r.get(key) is not None:
                    series.setdefault((r["impl"], r["variant"], r["peer"]), []).append((r["sweep"], r[key] * scale))
            for (impl, variant, peer), pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[variant], color=colors[impl],
                        linestyle="--" if peer else "-", linewidth=1.2 if peer else 2.2,
                        label=impl if len(curved) == 1 else f"{impl} [{variant}]")
            xs = sorted({r["sweep"] for r in ok})
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if key == "median_ms":
                ax.set_yscale("log")
            ax.set_xlabel(sweep_name)
            ax.set_ylabel(label)
            ax.set_title(f"{mode}, {dtype}")
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
    for ax in flat[k:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
