"""The Pareto plot of a planner choice: per-token latency vs device memory, coloured by fidelity.

Left: every feasible setting (grey) and the front, log axes. Right: the front alone, each point
labelled with its cut, the chosen one starred.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _xy(cands):
    return [c.costs.ms_per_token for c in cands], [c.costs.device_memory_mb for c in cands]


def plot_front(choice, title: str, out: str | os.PathLike, *, memory_limit_mb: float | None = None) -> Path:
    """PNG of the Pareto front of `choice` (planner.Choice) with the chosen point marked."""
    front, best = choice.front, choice.chosen
    top1 = [c.fidelity.top1 for c in front]
    fig, (ax_all, ax_front) = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
    ax_all.scatter(*_xy(choice.feasible_set or front), s=5, color="0.8", label="feasible settings")
    for ax in (ax_all, ax_front):
        sc = ax.scatter(*_xy(front), c=top1, cmap="viridis", s=26, label="Pareto front", zorder=2)
        ax.scatter([best.costs.ms_per_token], [best.costs.device_memory_mb], marker="*", s=320, facecolor="none",
                   edgecolor="red", linewidth=1.8, zorder=3,
                   label=f"chosen: cut {best.setting.cut}, {best.setting.front_precision}/"
                         f"{best.setting.back_precision}, KV {best.setting.kv_precision}, {best.setting.codec}")
        ax.set_xlabel("predicted ms per decode token")
        ax.grid(alpha=0.3)
    ax_all.set_xscale("log")
    ax_all.set_yscale("log")
    if memory_limit_mb is not None:
        ax_all.axhline(memory_limit_mb, color="grey", linestyle="--", linewidth=1, label="memory limit")
    ax_all.set_ylabel("predicted device memory, MB (full KV cache)")
    ax_all.set_title("all feasible settings (log axes)", fontsize=9)
    for c in front:
        ax_front.annotate(str(c.setting.cut), (c.costs.ms_per_token, c.costs.device_memory_mb), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    ax_front.set_title("Pareto front (labels: cut)", fontsize=9)
    fig.colorbar(sc, ax=ax_front, label="top-1 agreement with fp32 (estimated)")
    ax_all.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
