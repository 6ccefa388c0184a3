"""Charts of a profile report (matplotlib, no display needed): the roofline, and each op's share of the time.

Roofline (``plot_roofline``): log-log, x the arithmetic intensity (FLOP/byte), y the achieved
FLOP/s. The bandwidth roof is the slope y = x · peak_bytes_per_s, the compute roof the flat line
y = peak_flops; they meet at the ridge. One marker per op per run, its **area proportional to the
op's share of its phase's time** (``MAX_AREA`` for the whole phase), so the ops that matter are the
ones that show. The op's family (``family``: matmuls, attention, element-wise, communication) gives
its colour and shape; prefill markers are filled, decode markers hollow. In a sweep of batch or
prompt length, each run's largest op is labelled (batch, prompt length), the sweep is in the title,
and the points of one op in one phase are joined in order of intensity (each op's path toward the
ridge). Ops without FLOPs (embed) cannot sit on a log axis and are left out (the legend says so).
Without matplotlib a PNG is still drawn, plainly and without text, by ``llmrun.profiler.pngplot``.

Shares (``plot_shares``): one stacked bar per run, each op's share of the phase's time, the
unattributed time on top.
"""

from __future__ import annotations

from pathlib import Path

from llmrun.errors import LlmrunError
from llmrun.profiler.costs import LINEAR_OPS

MAX_AREA = 1600.0  # marker area in points² of an op taking the whole phase
FAMILIES = {  # colour, marker
    "matmul": ("#1f77b4", "s"),
    "attention": ("#d62728", "D"),
    "element-wise": ("#2ca02c", "o"),
    "communication": ("#9467bd", "P"),
}
COMMUNICATION = ("allreduce", "all_reduce", "allgather", "all_gather")


def family(op: str) -> str:
    """The family of an op name (a fused name takes its heaviest part's): a key of ``FAMILIES``."""
    parts = op.split("+")
    if any(part in LINEAR_OPS for part in parts):
        return "matmul"
    if "attention" in parts:
        return "attention"
    if any(word in part for part in parts for word in COMMUNICATION):
        return "communication"
    return "element-wise"


def marker_area(row: dict) -> float:
    """Marker area (points²) of an op row: proportional to its share of the phase's time."""
    return MAX_AREA * max(row["share"], 0.0)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_text(report: dict) -> str:
    """'sweep: batch 1, 16 × prompt 512' when the report sweeps, else ''."""
    batches = list(dict.fromkeys(run["batch"] for run in report["runs"]))
    prompts = list(dict.fromkeys(run["prompt_len"] for run in report["runs"]))
    if len(batches) == 1 and len(prompts) == 1:
        return ""
    return f"sweep: batch {', '.join(map(str, batches))} × prompt {', '.join(map(str, prompts))}"


def _title(report: dict, title: str | None) -> str:
    roofs, device = report["roofs"], report["device"]["name"]
    head = title or f"{report['model']} · {report['dtype']} · {device} · roofs: {roofs['source']}"
    paths = sorted({f"{run['phase']}: {run.get('path', 'eager')}" for run in report["runs"]})
    return "\n".join(filter(None, [head, sweep_text(report), "path " + ", ".join(paths)]))


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_roofline(report: dict, path: Path, *, title: str | None = None) -> Path:
    """Write the roofline chart of ``report`` to ``path`` (.png or .svg); returns ``path``."""
    if path.suffix.lower() not in (".png", ".svg"):
        raise LlmrunError(f"--plot {path}: the chart is written as .png or .svg")
    plt = _pyplot()
    if plt is None:
        if path.suffix.lower() != ".png":
            raise LlmrunError(f"--plot {path}: an SVG needs matplotlib (pip install matplotlib)") from None
        from llmrun.profiler.pngplot import draw_png

        return draw_png(report, path)
    fig = draw_roofline(report, plt, title=title)
    return _save(fig, plt, path)


def draw_roofline(report: dict, plt, *, title: str | None = None):
    """The roofline figure of ``report``; each op marker's ``gid`` is 'phase|batch|prompt_len|op|layer'."""
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
    _draw_points(ax, points, label_runs=bool(sweep_text(report)))
    for name, (colour, marker) in FAMILIES.items():
        if any(family(row["op"]) == name for _, row in points):
            ax.scatter([], [], marker=marker, color=colour, label=name)
    for phase, face in (("prefill", "grey"), ("decode", "white")):
        ax.scatter(
            [],
            [],
            marker="o",
            facecolors=face,
            edgecolors="black",
            label=f"{phase} ({'filled' if face != 'white' else 'hollow'})",
        )
    ax.plot([], [], " ", label="marker area ∝ share of the phase's time")
    if skipped:
        ax.plot([], [], " ", label=f"not drawn (0 FLOPs): {', '.join(skipped)}")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / byte of main memory)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(_title(report, title), fontsize=9)
    ax.grid(True, which="both", ls=":", lw=0.5, alpha=0.6)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _draw_points(ax, points: list[tuple[dict, dict]], *, label_runs: bool) -> None:
    """One marker per (run, op row), the paths of a sweep, and (in a sweep) each run's largest op labelled."""
    paths: dict[tuple, list] = {}
    largest: dict[int, tuple[dict, dict]] = {}
    for run, row in points:
        colour, marker = FAMILIES[family(row["op"])]
        xy = (row["intensity"], row["achieved_flops_per_s"])
        paths.setdefault((run["phase"], row["op"], row["layer"]), []).append(xy)
        ax.scatter(
            *xy,
            marker=marker,
            s=marker_area(row),
            facecolors=colour if run["phase"] == "prefill" else "none",
            edgecolors=colour if run["phase"] == "decode" else "black",
            linewidths=0.8,
            alpha=0.8,
            zorder=3,
            gid=f"{run['phase']}|{run['batch']}|{run['prompt_len']}|{row['op']}|{row['layer']}",
        )
        if id(run) not in largest or row["share"] > largest[id(run)][1]["share"]:
            largest[id(run)] = (run, row)
    for (_phase, op, _layer), xy in paths.items():
        xs = [x for x, _ in xy]
        if max(xs) > 1.05 * min(xs):  # ops whose intensity does not move (element-wise) draw no path
            ax.plot(*zip(*sorted(xy), strict=True), color=FAMILIES[family(op)][0], lw=0.8, alpha=0.5, zorder=2)
    if label_runs:
        for run, row in largest.values():
            ax.annotate(
                f"({run['batch']}, {run['prompt_len']})",
                (row["intensity"], row["achieved_flops_per_s"]),
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=7,
            )


def share_segments(run: dict) -> list[tuple[str, float]]:
    """(op, share) of every op row of ``run`` (all layers of a row together), then the unattributed time."""
    segments = [
        (row["op"] if row["layer"] is None else f"{row['layer']}.{row['op']}", row["share"]) for row in run["ops"]
    ]
    totals = run["totals"]
    return [*segments, ("(unattributed)", max(totals["unattributed_s"], 0.0) / totals["time_s"])]


def plot_shares(report: dict, path: Path) -> Path:
    """Write the time-share chart of ``report`` (one stacked bar per run) to ``path`` (.png or .svg)."""
    plt = _pyplot()
    if plt is None:
        raise LlmrunError(f"--plot-share {path}: the share chart needs matplotlib (pip install matplotlib)")
    runs = report["runs"]
    ops = list(dict.fromkeys(op for run in runs for op, _ in share_segments(run)))
    cmap = plt.get_cmap("tab20")
    colour = {op: ("lightgrey" if op == "(unattributed)" else cmap(i % 20)) for i, op in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(runs) + 4), 6), dpi=120)
    labels = [f"{run['phase']}\n({run['batch']}, {run['prompt_len']})" for run in runs]
    drawn = set()
    for x, run in enumerate(runs):
        bottom = 0.0
        for op, share in share_segments(run):
            ax.bar(x, share * 100, bottom=bottom, color=colour[op], edgecolor="white", lw=0.5,
                   label=None if op in drawn else op)  # fmt: skip
            drawn.add(op)
            bottom += share * 100
    ax.set_xticks(range(len(runs)), labels, fontsize=8)
    ax.set_ylabel("% of the phase's time (decode: per step)")
    ax.set_xlabel("phase (batch, prompt length)")
    ax.set_title(_title(report, None), fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, plt, path)
