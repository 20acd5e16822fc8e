"""Plots and a self-contained HTML report, drawn from an analysis document only (never from a live model).

    analysis.json's document -> spectra.png, whitened_spectra.png, ranks.png, loss_vs_rank.png, influence.png,
                     angular.png, plan.png -> report.html (every image inlined as base64: opens offline, anywhere)

`render(doc)` returns {file name: bytes}; nothing here touches the disk (io.write_report writes the files).
"""
from __future__ import annotations

import base64
import html
import io

from .errors import LayerzipError


def _figure(*subplots, **kw):
    """A Figure on the Agg canvas without pyplot: no display, no global backend state touched."""
    from matplotlib.figure import Figure
    fig = Figure(**kw)
    return fig, fig.subplots(*subplots, squeeze=False) if subplots else fig.subplots()


def _cmap(name: str):
    import matplotlib
    return matplotlib.colormaps[name]


def _kinds(doc: dict) -> list[str]:
    return sorted({m["kind"] for m in doc["modules"].values()})


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def _grid(n: int):
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = _figure(rows, cols, figsize=(3.6 * cols, 2.8 * rows))
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def plot_spectra(doc: dict, key: str, title: str) -> bytes:
    """σ_i / σ_1 per module kind, one line per block (colour = depth)."""
    kinds, L = _kinds(doc), doc["num_blocks"]
    fig, axes = _grid(len(kinds))
    cmap = _cmap("viridis")
    for ax, kind in zip(axes, kinds):
        for m in doc["modules"].values():
            if m["kind"] == kind and m[key] and m[key][0] > 0:
                s = m[key]
                ax.semilogy([x / s[0] for x in s], color=cmap((m["block"] or 0) / max(L - 1, 1)), lw=0.9)
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("index i", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("σᵢ / σ₁", fontsize=8)
    fig.suptitle(f"{title} (colour: block 0 → {L - 1})", fontsize=10)
    return _png(fig)


def plot_ranks(doc: dict) -> bytes:
    """Effective, stable and utilized (95 % whitened energy) rank per block, as a fraction of full rank."""
    fig, axes = _figure(1, 3, figsize=(13, 3.2))
    axes = list(axes.flat)
    measures = [("effective rank", lambda m: m["effective_rank"]), ("stable rank", lambda m: m["stable_rank"]),
                ("utilized rank (95 % whitened energy)", lambda m: m["utilized_rank"]["95"])]
    for ax, (title, f) in zip(axes, measures):
        for kind in _kinds(doc):
            ms = sorted((m for m in doc["modules"].values() if m["kind"] == kind), key=lambda m: m["block"] or 0)
            ax.plot([m["block"] for m in ms], [f(m) / min(m["shape"]) for m in ms], marker=".", label=kind)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylim(0, 1.05)
    axes[0].set_ylabel("fraction of full rank", fontsize=8)
    axes[-1].legend(fontsize=6, loc="best")
    return _png(fig)


def plot_loss_curves(doc: dict) -> bytes:
    """Relative layer loss of the best rank-r approximation vs the fraction of the module's parameters kept."""
    fig, ax = _figure(figsize=(7, 4))
    kinds = _kinds(doc)
    colors = {k: _cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    for m in doc["modules"].values():
        a, b = m["shape"]
        c = m["loss_curve"]
        ax.plot([r * (a + b) / (a * b) for r in c["rank"]], c["relative_loss"], color=colors[m["kind"]],
                lw=0.7, alpha=0.7)
    for k in kinds:
        ax.plot([], [], color=colors[k], label=k)
    ax.set_xlim(0, 1)
    ax.set_yscale("log")
    ax.set_xlabel("parameters kept, r(m+n)/(mn)")
    ax.set_ylabel("relative layer loss ‖(W−W_r)Xᵀ‖²/‖WXᵀ‖²")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_influence(doc: dict) -> bytes:
    bi = doc["blocks"]["influence"]
    fig, ax = _figure(figsize=(7, 3))
    drop = set(doc["plan"]["drop_blocks"])
    ax.bar(range(len(bi)), bi, color=["tab:red" if i in drop else "tab:blue" for i in range(len(bi))])
    ax.set_xlabel("block")
    ax.set_ylabel("Block Influence 1 − cos(in, out)")
    ax.set_title("Block Influence (red: dropped by the plan)", fontsize=9)
    return _png(fig)


def plot_angular(doc: dict) -> bytes:
    """Heatmap of d(x^ℓ, x^{ℓ+n}) over start block ℓ and span n (Gromov et al., Fig. 1 style)."""
    import numpy as np
    D = np.array([[np.nan if x is None else x for x in row] for row in doc["blocks"]["span_distance"]], float)
    fig, ax = _figure(figsize=(6.5, 5))
    im = ax.imshow(D, origin="lower", aspect="auto", cmap="viridis",
                   extent=(0.5, D.shape[1] + 0.5, -0.5, D.shape[0] - 0.5))
    fig.colorbar(im, ax=ax, label="angular distance arccos(cos)/π")
    ax.set_xlabel("blocks spanned n")
    ax.set_ylabel("first block ℓ")
    ax.set_title("d(x^ℓ, x^(ℓ+n))", fontsize=9)
    return _png(fig)


def plot_plan(doc: dict) -> bytes:
    c = doc["plan"]["candidates"]
    fig, ax = _figure(figsize=(6, 3))
    ax.plot([len(x["drop_blocks"]) for x in c], [x["damage"] for x in c], marker="o")
    ax.set_xlabel("blocks dropped (rest: low rank)")
    ax.set_ylabel("estimated damage")
    ax.set_title(f"plans at keep {doc['plan']['keep']}", fontsize=9)
    return _png(fig)


PLOTS = {"spectra.png": lambda d: plot_spectra(d, "spectrum", "singular values of W"),
         "whitened_spectra.png": lambda d: plot_spectra(d, "whitened_spectrum", "singular values of W·L "
                                                        "(whitened by the input Gram)"),
         "ranks.png": plot_ranks, "loss_vs_rank.png": plot_loss_curves, "influence.png": plot_influence,
         "angular.png": plot_angular, "plan.png": plot_plan}

CHECK_IMAGES = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", imgs.length);
  document.body.setAttribute("data-images-loaded", ok);
  document.getElementById("image-check").textContent = ok + " of " + imgs.length + " figures rendered";
});
</script>"""


def _table(rows: list[list], head: list[str]) -> str:
    esc = lambda x: html.escape(str(x))
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def render_html(doc: dict, images: dict[str, bytes]) -> str:
    esc = html.escape
    plan = doc["plan"]
    imgs = "".join(f'<figure><img alt="{esc(n)}" src="data:image/png;base64,'
                   f'{base64.b64encode(png).decode()}"><figcaption>{esc(n)}</figcaption></figure>'
                   for n, png in images.items())
    blocks = _table([[i, f"{b:.4g}", f"{doc['blocks']['angular'][i][i + 1]:.4g}"]
                     for i, b in enumerate(doc["blocks"]["influence"])],
                    ["block", "Block Influence", "angular step d(ℓ, 1)"])
    mods = _table([[n, "×".join(map(str, m["shape"])), m["effective_rank"], m["stable_rank"],
                    m["utilized_rank"]["90"], m["utilized_rank"]["95"], m["utilized_rank"]["99"]]
                   for n, m in doc["modules"].items()],
                  ["module", "shape", "effective rank", "stable rank", "utilized 90 %", "utilized 95 %",
                   "utilized 99 %"])
    cal = doc.get("calibration", {})
    cmd = (f"layerzip compress {doc.get('model', 'MODEL')} --method drop-blocks+svd-llm --select influence "
           f"--blocks {plan['blocks']} --keep {plan['keep']}" if plan["blocks"] else
           f"layerzip compress {doc.get('model', 'MODEL')} --method svd-llm --keep {plan['keep']}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>layerzip analysis: {esc(str(doc.get('model')))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}img{{max-width:100%}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}</style></head>
<body><h1>layerzip analysis: {esc(str(doc.get('model')))}</h1>
<p>{esc(doc['architecture'])}, {doc['num_blocks']} blocks, {len(doc['modules'])} modules;
calibration: {esc(str(cal.get('source')))}, {doc['tokens']} tokens. <span id="image-check"></span></p>
<h2>Recommended plan at keep {plan['keep']}</h2>
<p>Drop blocks {esc(str(plan['drop_blocks']))}, then low rank at keep {plan['lowrank_keep']} on the rest
(estimated damage {plan['damage']}). Command: <code>{esc(cmd)}</code></p><p><small>{esc(plan['rule'])}</small></p>
{imgs}
<h2>Blocks</h2>{blocks}
<h2>Modules</h2>{mods}
{CHECK_IMAGES}
</body></html>"""


def render(doc: dict) -> dict[str, bytes]:
    """{file name: content} of every plot and of report.html, for an analysis document."""
    if doc.get("format") != "layerzip-analysis":
        raise LayerzipError("not a layerzip analysis document; re-run layerzip analyze")
    images = {name: draw(doc) for name, draw in PLOTS.items()}
    return {**images, "report.html": render_html(doc, images).encode("utf-8")}
