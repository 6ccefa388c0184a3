"""A log-log roofline chart of a profile report (matplotlib, no display needed).

x: arithmetic intensity (FLOP/byte); y: achieved FLOP/s. The bandwidth roof is the slope
y = x · peak_bytes_per_s, the compute roof the flat line y = peak_flops; they meet at the ridge.
One point per op per run: circles for prefill, triangles for decode, one colour per op. When
the report sweeps batch or prompt length, the points of one op in one phase are joined in order
of intensity, which draws each op's path toward the ridge. Ops without FLOPs (embed) cannot sit on a
log axis and are left out (the legend says so). Without matplotlib a PNG is still drawn, plainly
and without text, by ``llmrun.profiler.pngplot``.
"""

from __future__ import annotations

from pathlib import Path

from llmrun.errors import LlmrunError

MARKERS = {"prefill": "o", "decode": "^"}


def plot_roofline(report: dict, path: Path, *, title: str | None = None) -> Path:
    """Write the chart of ``report`` to ``path`` (.png or .svg); returns ``path``."""
    if path.suffix.lower() not in (".png", ".svg"):
        raise LlmrunError(f"--plot {path}: the chart is written as .png or .svg")
    try:
        import matplotlib
    except ImportError:
        if path.suffix.lower() != ".png":
            raise LlmrunError(f"--plot {path}: an SVG needs matplotlib (pip install matplotlib)") from None
        from llmrun.profiler.pngplot import draw_png

        return draw_png(report, path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roofs = report["roofs"]
    peak_f, peak_b = roofs["peak_flops"], roofs["peak_bytes_per_s"]
    ridge = peak_f / peak_b
    points = [
        (run, row)
        for run in report["runs"]
        for row in run["ops"]
        if row["flops"] > 0 and row["bytes"] > 0 and row["time_s"] > 0
    ]
    skipped = sorted({row["op"] for run in report["runs"] for row in run["ops"] if row["flops"] <= 0})
    xs = [row["intensity"] for _, row in points] or [ridge]
    lo, hi = min(min(xs), ridge) / 4, max(max(xs), ridge) * 4
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=120)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.plot([lo, ridge], [lo * peak_b, peak_f], color="black", lw=2, label=f"bandwidth roof {peak_b / 1e9:.4g} GB/s")
    ax.plot([ridge, hi], [peak_f, peak_f], color="dimgray", lw=2, label=f"compute roof {peak_f / 1e9:.4g} GFLOP/s")
    ax.axvline(ridge, color="gray", ls=":", lw=1)
    ax.annotate(f"ridge {ridge:.3g} FLOP/B", (ridge, peak_f), textcoords="offset points", xytext=(5, 6), fontsize=8)
    ops = list(dict.fromkeys(row["op"] for _, row in points))
    cmap = plt.get_cmap("tab20")
    colour = {op: cmap(i % 20) for i, op in enumerate(ops)}
    paths: dict[tuple, list] = {}
    for run, row in points:
        key = (run["phase"], row["op"], row["layer"])
        paths.setdefault(key, []).append((row["intensity"], row["achieved_flops_per_s"]))
        ax.scatter(
            row["intensity"],
            row["achieved_flops_per_s"],
            marker=MARKERS[run["phase"]],
            color=colour[row["op"]],
            edgecolors="black",
            linewidths=0.4,
            s=36,
            zorder=3,
        )
    for (_phase, op, _layer), xy in paths.items():
        xs_ = [x for x, _ in xy]
        if max(xs_) > 1.05 * min(xs_):  # ops whose intensity does not move (element-wise) draw no path
            ax.plot(*zip(*sorted(xy), strict=True), color=colour[op], lw=0.8, alpha=0.7, zorder=2)
    for op in ops:
        ax.scatter([], [], marker="s", color=colour[op], label=op)
    for phase, marker in MARKERS.items():
        ax.scatter([], [], marker=marker, color="white", edgecolors="black", label=phase)
    if skipped:
        ax.plot([], [], " ", label=f"not drawn (0 FLOPs): {', '.join(skipped)}")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte of main memory)")
    ax.set_ylabel("achieved FLOP/s")
    device = report["device"]["name"]
    ax.set_title(title or f"{report['model']} · {report['dtype']} · {device} · roofs: {roofs['source']}", fontsize=10)
    ax.grid(True, which="both", ls=":", lw=0.5, alpha=0.6)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
