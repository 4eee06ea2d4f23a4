"""How the demo shows a comparison: token HTML coloured by diffusion z-score, and two matplotlib figures.

Figures are ``matplotlib.figure.Figure`` objects, never pyplot ones, so nothing keeps them alive after Gradio
has encoded them (pyplot's figure manager would hold every figure of every request).
"""

from __future__ import annotations

import html
import math

import torch

from .comparison import Comparison, RunResult

_CALM, _NOISY = (38, 110, 210), (214, 50, 40)


def _z_color(z: float) -> str:
    """Blue for calm (z < 0), red for noisy (z > 0) states, stronger with |z|."""
    if not math.isfinite(z):
        return "transparent"
    rgb = _NOISY if z > 0 else _CALM
    a = min(abs(z) / 2.5, 1.0) * 0.75
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {a:.2f})"


def render_tokens(run: RunResult, prompt: str, *, chat: bool = False) -> str:
    """HTML of the continuation with each token's background coloured by its diffusion z-score.

    The prompt is shown faded before it (for a chat prompt: the user's text on its own line, not the template).
    """
    z = run.steps["zscore"]
    temp, steer = run.steps["temperature"], run.steps["steer_norm"]
    if run.trace is not None:
        z = run.trace.zscore[0].tolist()
        temp, steer = run.trace.temperature[0].tolist(), run.trace.steer_norm[0].tolist()
    spans = []
    for k, piece in enumerate(run.pieces):
        zk = z[k] if k < len(z) else float("nan")
        tip = f"step {k}: diffusion z {zk:+.2f}"
        if k < len(temp):
            tip += f", temperature {temp[k]:.2f}, steering {steer[k]:.3f}"
        spans.append(f'<span class="sde-tok" title="{html.escape(tip)}" style="background:{_z_color(zk)};'
                     f'border-radius:3px">{html.escape(piece)}</span>')
    sep = "\n" if chat else ""
    status = "" if run.done else ' <span class="sde-cursor">&#9612;</span>'
    stats = ""
    if run.num_tokens:
        finite = [x for x in z if math.isfinite(x)]
        mean_z = sum(finite) / len(finite) if finite else float("nan")
        stats = f"{run.num_tokens} tokens, mean z {mean_z:+.2f}"
        if temp:
            stats += f", mean temperature {sum(t for t in temp if math.isfinite(t)) / max(len(temp), 1):.2f}"
        if any(s for s in steer if math.isfinite(s)):
            stats += f", mean steering {sum(s for s in steer if math.isfinite(s)) / max(len(steer), 1):.3f}"
        stats += f", {run.seconds:.1f} s"
    return (f'<div class="sde-run" data-done="{str(run.done).lower()}">'
            f'<div style="font-weight:600;margin-bottom:4px">{html.escape(run.label)} '
            f'<span style="font-weight:400;opacity:.7">({html.escape(run.mode)})</span></div>'
            f'<div style="line-height:1.9;white-space:pre-wrap;font-size:1.05em">'
            f'<span class="sde-prompt" style="opacity:.6">{html.escape(prompt)}{sep}</span>{"".join(spans)}{status}</div>'
            f'<div style="opacity:.7;font-size:.85em;margin-top:4px">{html.escape(stats)}</div></div>')


LEGEND_HTML = (
    '<div style="font-size:.85em;opacity:.85">Token background: diffusion z-score of the state that produced it '
    '(calibrated on the training transitions) &nbsp; '
    f'<span style="background:{_z_color(-2.5)};padding:0 6px;border-radius:3px">calm z &le; -2.5</span> '
    f'<span style="background:{_z_color(-1)};padding:0 6px;border-radius:3px">-1</span> '
    '<span style="padding:0 6px">0</span> '
    f'<span style="background:{_z_color(1)};padding:0 6px;border-radius:3px">+1</span> '
    f'<span style="background:{_z_color(2.5)};padding:0 6px;border-radius:3px">noisy z &ge; +2.5</span>'
    ' &nbsp; (hover a token for its numbers)</div>'
)


def _series(run: RunResult, name: str) -> list[float]:
    """A per-step statistic: the final trace when there is one, else what has streamed so far."""
    if run.trace is not None:
        return getattr(run.trace, name)[0].tolist()
    return list(run.steps[name])


def trace_figure(cmp: Comparison):
    """Matplotlib figure: diffusion z-score, applied temperature and steering norm per step, both runs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5.6), dpi=100, layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    runs = ((cmp.plain, "#7f7f7f", "plain"), (cmp.controlled, "#d62728", f"controlled ({cmp.controlled.mode})"))
    for name, ax, ylabel in (("zscore", axes[0], "diffusion z"), ("temperature", axes[1], "temperature"),
                             ("steer_norm", axes[2], "steering ||Δh||")):
        for run, color, label in runs:
            ys = _series(run, name)
            if ys:
                ax.plot(range(len(ys)), ys, color=color, lw=1.6 if run is cmp.controlled else 1.2,
                        marker="o", ms=2.5, label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.6, alpha=0.5)
    p = cmp.params
    if "temperature" in cmp.controlled.mode:
        for bound in (p["min_temperature"], p["max_temperature"]):
            axes[1].axhline(bound, color="#1f77b4", lw=0.8, ls="--", alpha=0.6)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[2].set_xlabel("generation step")
    fig.suptitle("Per-step SDE statistics", fontsize=11)
    return fig


def phase_figure(cmp: Comparison):
    """Matplotlib figure: both paths on the first two SDE (PCA) coordinates over simulated paths of the SDE."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()

    def xy(path: torch.Tensor) -> tuple[list[float], list[float]]:
        x = path[..., 0]
        y = path[..., 1] if path.shape[-1] > 1 else torch.zeros_like(x)
        return x.tolist(), y.tolist()

    if cmp.cloud is not None:
        # The states of all simulated paths as a faint cloud, and two of the paths as lines.
        x, y = xy(cmp.cloud[:, 1:].reshape(-1, cmp.cloud.shape[-1]))
        ax.scatter(x, y, s=6, color="#6f94c8", alpha=0.18, linewidths=0,
                   label=f"{cmp.cloud.shape[0]} simulated SDE paths (states)")
        for i, path in enumerate(cmp.cloud[:2]):
            x, y = xy(path)
            ax.plot(x, y, color="#3b6db3", lw=0.7, alpha=0.5, label="two simulated paths" if i == 0 else None)
    p = len(cmp.prompt_ids) - 1
    for run, color, label in ((cmp.plain, "#555555", "plain"), (cmp.controlled, "#d62728", "controlled")):
        if run.path is None:
            continue
        x, y = xy(run.path)
        if run is cmp.controlled and p > 0:
            ax.plot(x[: p + 1], y[: p + 1], color="k", lw=1.0, ls=":", alpha=0.7, label="prompt")
        ax.plot(x[p:], y[p:], color=color, lw=1.8 if run is cmp.controlled else 1.2, marker="o", ms=2.5,
                alpha=0.95 if run is cmp.controlled else 0.7, label=label)
        ax.plot(x[-1], y[-1], marker="s", ms=6, color=color)
    if cmp.controlled.path is not None:
        x, y = xy(cmp.controlled.path)
        ax.plot(x[p], y[p], marker="*", ms=13, color="#ff9900", markeredgecolor="k", label="start (last prompt token)",
                linestyle="none")
    # Frame the generated paths and the bulk of the cloud (a few far-flung simulated states would shrink the rest).
    frame = [run.path[len(cmp.prompt_ids) - 1:] for run in (cmp.plain, cmp.controlled) if run.path is not None]
    if cmp.cloud is not None:
        pts = cmp.cloud.reshape(-1, cmp.cloud.shape[-1])
        pts = pts[torch.isfinite(pts).all(-1)]
        if len(pts):
            lo, hi = torch.quantile(pts[:, :2].float(), torch.tensor([0.03, 0.97]), dim=0)
            frame.append(torch.stack([lo, hi]))
    if frame:
        both = torch.cat([f[:, :2] if f.shape[-1] > 1 else torch.cat([f, torch.zeros_like(f)], -1) for f in frame])
        both = both[torch.isfinite(both).all(-1)]
        if len(both):
            lo, hi = both.min(0).values, both.max(0).values
            pad = (hi - lo).clamp_min(1e-3) * 0.08
            ax.set_xlim(float(lo[0] - pad[0]), float(hi[0] + pad[0]))
            ax.set_ylim(float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    ax.set_xlabel("Z1 (first SDE / PCA coordinate)")
    ax.set_ylabel("Z2 (second SDE / PCA coordinate)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Phase plane: generated paths over simulated SDE paths", fontsize=11)
    return fig


def summary_markdown(cmp: Comparison) -> str:
    """One line under the title: progress while streaming, then token counts, times and the seed."""
    if not cmp.done:
        return (f"Generating... plain {cmp.plain.num_tokens}, controlled {cmp.controlled.num_tokens} tokens "
                f"(seed {cmp.params['seed']})")
    same = cmp.plain.token_ids == cmp.controlled.token_ids
    return (f"**finished**: plain {cmp.plain.num_tokens} tokens in {cmp.plain.seconds:.1f} s, controlled "
            f"{cmp.controlled.num_tokens} tokens in {cmp.controlled.seconds:.1f} s, seed {cmp.params['seed']}"
            + (" (identical continuations)" if same else ""))
