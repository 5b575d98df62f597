r"""Figure of notebook 06: throughput and peak memory per method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt
import numpy as np

from .files import publish
from .style import COLUMN_WIDTH, method_color, method_label

__all__ = ['plot_overhead', 'publish_overhead']

def plot_overhead(data: Mapping[str, Any]):
    """Throughput (training steps per second) and peak training memory per method, side by
    side (analogue of ``paper-throughput-memory.png``), machine name in the title."""
    res = data["results"]
    names = [r["method"] for r in res]
    colors = [method_color(m) for m in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * COLUMN_WIDTH, 2.6))
    x = np.arange(len(res))
    thr = [r["steps_per_second"] for r in res]
    mem = [r["peak_memory_mb"] for r in res]
    b1 = ax1.bar(x, thr, color=colors, width=0.7)
    b2 = ax2.bar(x, mem, color=colors, width=0.7)
    rel = data.get("relative_time", {})
    for bar, r in zip(b1, res):
        ratio = rel.get(r["method"])
        txt = f"{r['steps_per_second']:.2f}" + (f"\n({ratio:.2f}x)" if ratio else "")
        ax1.annotate(txt, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=5.5, xytext=(0, 1), textcoords="offset points")
    for bar, r in zip(b2, res):
        ax2.annotate(f"{r['peak_memory_mb']:.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=5.5, xytext=(0, 1), textcoords="offset points")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels([method_label(m) for m in names], rotation=45, ha="right")
        ax.grid(axis="x", visible=False)
        ax.margins(y=0.18)
    ax1.set_ylabel("throughput (steps/s)")
    ax1.set_title("training throughput (time relative to LoRA)")
    kind = res[0]["memory_kind"] if res else ""
    ax2.set_ylabel("peak training memory (MB)")
    ax2.set_title("peak memory " + ("(CUDA allocator)" if "cuda" in kind else "(CPU: peak RSS delta)"))
    machine = data.get("machine", {})
    steps = data.get("steps")
    fig.suptitle(f"Overhead per method, {data.get('task')} + {data.get('optimizer')}, "
                 f"on {machine.get('device_name', '?')}\n"
                 + (f"median of {steps} steps, methods interleaved round-robin on the same weights"
                    if data.get("interleave") else
                    f"median of {steps} steps per process; short runs vary by about 20%"),
                 fontsize=8)
    fig.tight_layout()
    return fig


def publish_overhead(data: Mapping[str, Any], out) -> dict[str, dict]:
    """Notebook 06's figure into ``out``: ``overhead``."""
    return {"overhead": publish(plot_overhead(data), Path(out) / "overhead", {
        "caption": "training throughput and peak memory per method, measured in this run; "
                   "analogue of paper-throughput-memory.png", "data": "overhead.csv"})}
