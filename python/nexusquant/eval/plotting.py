"""Quality against real compression ratio, one line per method (matplotlib, no pyplot state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from .report import summary_rows

__all__ = ["plot_results"]

_MARKERS = {
    "nexusquant": "o",
    "nexusquant-e8": "D",
    "nexusquant-variant": "h",
    "snapkv": "s",
    "expected-attention": "^",
    "knorm": "v",
    "streamingllm": "<",
    "quanto": "P",
    "hqq": "X",
    "int": "*",
}


def _lines(rows: list[dict[str, Any]], families: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(family, points sorted by ratio) per line; each nexusquant variant is a line of its own."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for fam in families:
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["ratio"])
        if fam == "nexusquant-variant":
            out.extend((fam, [p]) for p in pts)
        elif pts:
            out.append((fam, pts))
    return out


def plot_results(result: dict[str, Any], path: Union[str, Path]) -> None:
    """Draw PPL delta (top) and pass-key accuracy (bottom) against the real prompt compression ratio,
    one column per prefix length, means over the texts; write a PNG to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = summary_rows(result)
    prefixes = sorted({r["prefix"] for r in rows})
    has_retrieval = result["config"]["retrieval_trials"] > 0
    nrows = 2 if has_retrieval else 1
    fig = Figure(figsize=(4.6 * len(prefixes) + 3.2, 3.4 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, len(prefixes), squeeze=False)
    families = []
    for r in rows:
        if r["kind"] != "baseline" and r["family"] not in families:
            families.append(r["family"])
    ratio_fmt = FuncFormatter(lambda v, _: f"{v:g}x")

    def style_x(ax: Any) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(ratio_fmt)
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("real compression ratio (fp16 bytes / bytes held)")
        ax.grid(True, which="both", alpha=0.3)

    for col, prefix in enumerate(prefixes):
        here = [r for r in rows if r["prefix"] == prefix]
        base = next(r for r in here if r["kind"] == "baseline")
        ax = axes[0][col]
        ax.axhline(0.0, color="black", lw=1, ls="--", label="uncompressed")
        for fam, pts in _lines(here, families):
            ax.plot(
                [p["ratio"] for p in pts],
                [p["ppl_delta_pct"] for p in pts],
                marker=_MARKERS.get(fam, "o"),
                ls="-" if len(pts) > 1 else "none",
                label=pts[0]["label"] if fam != "nexusquant-variant" else pts[0]["method"],
            )
        style_x(ax)
        deltas = [r["ppl_delta_pct"] for r in here]
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(min(-1.0, 1.3 * min(deltas)), max(2.0, 1.5 * max(deltas)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:+g}%" if v else "0"))
        ax.set_title(f"prefix {prefix}, continuation {result['config']['continuation']}")
        ax.set_ylabel("perplexity change vs uncompressed")
        if has_retrieval:
            ax = axes[1][col]
            acc = base["retrieval_accuracy"]
            ax.axhline(acc if acc is not None else 0.0, color="black", lw=1, ls="--", label="uncompressed")
            for fam, pts in _lines(here, families):
                ax.plot(
                    [p["ratio"] for p in pts],
                    [p["retrieval_accuracy"] for p in pts],
                    marker=_MARKERS.get(fam, "o"),
                    ls="-" if len(pts) > 1 else "none",
                )
            style_x(ax)
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel(f"pass-key accuracy ({base['retrieval_trials']} trials)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    env = result["environment"]
    m = env["model"]
    texts = ", ".join(t["name"] for t in result["texts"])
    fig.suptitle(
        f"{m['name']} ({m['dtype']}), nexusquant {env['nexusquant']}\ntexts: {texts} (means over texts)",
        fontsize="medium",
        x=0.02,
        ha="left",
    )
    fig.savefig(str(path), dpi=110)
