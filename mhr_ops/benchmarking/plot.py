"""The PNG of a bench record: per shape set, the times of every implementation (grouped bars,
median with the interquartile range as error bars) and their time ratios to the case's baseline
(per rep, lower is better, targets marked); on CUDA also a roofline of the cases that record bytes
and flops. Needs matplotlib (imported here, at module import)."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .harness import Stat  # noqa: E402

COLORS = {"bare": "0.55", "peft": "tab:orange", "mhr_ops": "tab:blue", "reference_fp64": "tab:purple"}
OTHER_COLORS = ["tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]


def _color(name: str, others: dict) -> str:
    if name in COLORS:
        return COLORS[name]
    return others.setdefault(name, OTHER_COLORS[len(others) % len(OTHER_COLORS)])


def _bars(ax, cases, series, colors, ylabel, targets=None, annotate=False):
    """Grouped bars: ``series[name][i]`` is a Stat (or None) for case i, IQR error bars;
    ``targets[name][i]`` a bound drawn as a red line over that bar; ``annotate``: the median."""
    width = 0.8 / max(1, len(series))
    for j, (name, stats) in enumerate(series.items()):
        offset = (j - (len(series) - 1) / 2) * width
        bounds = (targets or {}).get(name, [None] * len(cases))
        for i, (s, bound) in enumerate(zip(stats, bounds, strict=True)):
            if s is None:
                continue
            err = [[s.median - s.q1], [s.q3 - s.median]]
            label = name if i == next(k for k, v in enumerate(stats) if v is not None) else None
            ax.bar(
                i + offset,
                s.median,
                width,
                yerr=err,
                capsize=2,
                color=colors[name],
                label=label,
                edgecolor="black",
                linewidth=0.4,
            )
            if bound is not None:
                ax.hlines(bound, i + offset - width / 2, i + offset + width / 2, color="red", linewidth=2)
            if annotate:
                ax.annotate(
                    f"{s.median:.2f}x",
                    (i + offset, s.q3),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)


def plot(record: dict, path: str) -> None:
    sets: dict[str, list[dict]] = {}
    for r in record["results"]:
        sets.setdefault(r["shape_set"], []).append(r)
    roofline = [r for r in record["results"] if "bytes" in r["extra"] and "flops" in r["extra"]]
    rows = len(sets) + (1 if roofline else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(15, 4.2 * rows), squeeze=False)
    others: dict[str, str] = {}
    for row, (name, results) in enumerate(sets.items()):
        cases = [r["case"] for r in results]
        impls = list(dict.fromkeys(k for r in results for k in r["samples_us"]))
        colors = {i: _color(i, others) for i in impls}
        unit, scale = ("ms", 1e-3) if max(r["times_us"][r["baseline"]]["median"] for r in results) > 2000 else ("us", 1)
        times = {
            i: [_scaled(Stat.of(r["samples_us"][i]), scale) if i in r["samples_us"] else None for r in results]
            for i in impls
        }
        ax = axes[row][0]
        _bars(ax, cases, times, colors, f"time per call ({unit}), log scale")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{name}: time, median and IQR over interleaved reps", fontsize=10)
        ax.legend(fontsize=8)

        # The per-rep time ratios "X / baseline" the table prints, one series per X.
        ratios, targets = {}, {}
        for i in impls:
            metrics = [_metric(r, f"{i} / {r['baseline']}") for r in results]
            if any(metrics):
                ratios[i] = [Stat(**m["stat"]) if m else None for m in metrics]
                targets[i] = [m["target"] if m else None for m in metrics]
        ax = axes[row][1]
        _bars(ax, cases, ratios, colors, "time / baseline's time (lower is better)", targets, annotate=True)
        ax.axhline(1.0, color="black", linewidth=0.8)
        baselines = ", ".join(sorted({r["baseline"] for r in results}))
        ax.set_title(f"{name}: time relative to {baselines} (per rep; red bar = target)", fontsize=10)
        if max((s.q3 for ss in ratios.values() for s in ss if s is not None), default=1) > 4:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%gx"))
    if roofline:
        _roofline(axes[-1][0], roofline)
        axes[-1][1].axis("off")
    fig.suptitle(f"mhr_ops bench on {record['device']}, torch {record['torch']}, mhr_ops {record['commit'][:12]}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metric(result: dict, name: str) -> dict | None:
    return next((m for m in result["metrics"] if m["name"] == name), None)


def _scaled(s: Stat, k: float) -> Stat:
    return Stat(s.median * k, s.q1 * k, s.q3 * k, s.min * k, s.max * k, s.n)


def _roofline(ax, results: list[dict]) -> None:
    """Achieved TFLOP/s against arithmetic intensity, under min(bandwidth * intensity, peak)."""
    ceilings = results[0]["extra"]["ceilings"]
    bw, peak = ceilings["copy_GBps"] * 1e9, ceilings["bf16_gemm_TFLOPs"] * 1e12
    xs = [10 ** (k / 10) for k in range(-10, 41)]
    ax.plot(xs, [min(bw * x, peak) / 1e12 for x in xs], color="black", label="roofline (measured copy BW, bf16 GEMM)")
    for r in results:
        t = r["times_us"][r["extra"]["roofline_impl"]]["median"] * 1e-6
        intensity = r["extra"]["flops"] / r["extra"]["bytes"]
        ax.plot(intensity, r["extra"]["flops"] / t / 1e12, "o", label=f"{r['shape_set']}: {r['case']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("roofline of the adapter path", fontsize=10)
    ax.legend(fontsize=8)
