"""What `theta-store diff` (and `delta`, `log`) says about a change: the report of one file,
its one-line summary, the per-tensor table, the terminal strip and the HTML page.

The figures come from `deltas` (the one home of per-tensor statistics); this module only
gathers and draws them.
"""

from __future__ import annotations

import html
import json
import math
import re
from typing import Any

from .errors import ThetaStoreError
from .sizes import human_size

SHADES = " ░▒▓█"  # unchanged, then relative change < 1e-3, < 1e-2, < 1e-1, >= 1e-1 (or a new tensor)
SHADE_EDGES = (1e-3, 1e-2, 1e-1)
_LEAF = re.compile(r"\.(weight|bias)$")
_LAYER = re.compile(r"^(.*?)\.?(\d+)\.(.+)$")


def layer_module(name: str) -> tuple[str | None, str]:
    """(layer, module) of a tensor name: `encoder.layer.3.attention.self.query.weight` ->
    ("encoder.layer.3", "attention.self.query"), `model.layers.3.mlp.up_proj.weight` ->
    ("model.layers.3", "mlp.up_proj"), `h.3.attn.c_attn.bias` -> ("h.3", "attn.c_attn");
    a name with no numbered part -> (None, the name without .weight/.bias)."""
    m = _LAYER.match(name)
    if m is None:
        return None, _LEAF.sub("", name)
    prefix, idx, rest = m.groups()
    return (f"{prefix}.{idx}" if prefix else idx), (_LEAF.sub("", rest) or rest)


def file_report(deltas: Any, *, show_all: bool = False, rank: bool = False) -> dict[str, Any]:
    """One file's diff as a JSON-able dict: summary (see `Deltas.summary`) and its line, the
    metadata changes, and per tensor (unchanged ones only with `show_all`) its kind, shapes,
    dtypes, stored bytes, statistics (`Delta.stats`) and, with `rank`, its numerical rank."""
    summary = deltas.summary()
    tensors = []
    for name, t in deltas.items():
        kind = t.kind
        if kind == "unchanged" and not show_all:
            continue
        layer, module = layer_module(name)
        entry: dict[str, Any] = {"name": name, "kind": kind, "dtype": t.dtype, "shape": _list(t.shape)}
        entry.update(base_dtype=t.base_dtype, base_shape=_list(t.base_shape), layer=layer, module=module)
        entry["encoding"] = None if kind in ("unchanged", "removed", "added", "reshaped") else kind
        try:
            entry["stats"] = t.stats
        except ThetaStoreError as e:  # a non-numeric dtype: its values have no difference
            entry["stats"] = {"stored_bytes": t.stored_bytes, "rank": None, "note": e.args[0]}
        if rank:
            try:
                entry["numerical_rank"] = t.numerical_rank()
            except ThetaStoreError:
                entry["numerical_rank"] = None
        tensors.append(entry)
    # The share of parameters that changed, element by element, now that the figures are read.
    summary["elements_changed"] = sum(t["stats"].get("changed") or 0 for t in tensors if t["kind"] != "unchanged")
    out = {
        "path": deltas.path,
        "status": "changed",
        "base": deltas.base,
        "rev": deltas.rev,
        "base_version": deltas.base_version.hex(),
        "version": deltas.version.hex(),
        "summary": summary,
        "summary_line": summary_line(summary),
        "counts": summary["counts"],
        "stored_bytes": summary["stored_bytes"],
        "metadata": deltas.metadata_changes(),
        "metadata_label": deltas.metadata_label,
        "tensors": tensors,
    }
    out["layers"] = _grid(deltas, tensors)
    return out


def _list(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)


def summary_line(s: dict[str, Any]) -> str:
    """ "12 of 199 tensors changed (8 bits, 4 low-rank), 2.1% of parameters, stored 412 kB, low-rank r=8 on 4".

    With `elements_changed` (a diff, which reads the tensors) the percentage is of elements
    whose bits changed; without (a log, manifests only) it is of the elements the changed
    tensors hold ("... changed holding 5.9% of parameters").
    """
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(s["counts"].items()) if k != "unchanged")
    exact = s.get("elements_changed")
    part = s["parameters_changed"] if exact is None else exact
    pct = 100.0 * part / s["parameters"] if s["parameters"] else (100.0 if part else 0.0)
    line = f"{s['changed']} of {s['tensors']} tensors changed" + (f" ({kinds})" if kinds else "")
    shown = f"{pct:.2g}" if pct < 10 else f"{pct:.3g}"  # 2.1, 12.3, 100 (not 1e+02)
    line += f", {shown}% of parameters" if exact is not None else f" holding {shown}% of parameters"
    line += f", stored {human_size(s['stored_bytes'])}"
    ranks = s["low_rank_ranks"]
    if ranks:
        r = str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}..{max(ranks)}"
        line += f", low-rank r={r} on {len(ranks)}"
    return line


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _change(old: Any, new: Any, fmt: Any) -> str:
    if old is None or new is None or old == new:
        return str(fmt(new if new is not None else old))
    return f"{fmt(old)}->{fmt(new)}"


def _shape(s: list[int] | None) -> str:
    return "-" if s is None else "x".join(map(str, s)) or "scalar"


TABLE_HEADER = ["tensor", "kind", "shape", "changed", ">1e-6", "|dW|", "|dW|/|W|", "cosine", "max|dW|", "rank", "stored", "dtype"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """The per-tensor table's rows (columns: TABLE_HEADER)."""
    rows = []
    for t in report["tensors"]:
        st = t["stats"]
        rank = st.get("rank")
        num_rank = t.get("numerical_rank")
        rank_cell = "-" if rank is None and num_rank is None else "/".join(str(r) for r in (rank, num_rank) if r is not None)
        rows.append(
            [
                t["name"],
                t["kind"],
                _change(t["base_shape"], t["shape"], _shape),
                _num(st.get("fraction_changed"), ".4g"),
                _num(st.get("fraction_changed_at"), ".4g"),
                _num(st.get("norm_delta")),
                _num(st.get("rel_change")),
                _num(st.get("cosine"), ".6f"),
                _num(st.get("max_abs_delta")),
                rank_cell,
                human_size(st.get("stored_bytes") or 0),
                _change(t["base_dtype"], t["dtype"], str),
            ]
        )
    return rows


def metadata_lines(meta: dict[str, Any]) -> list[str]:
    """Metadata changes, one line each: `+ key: value`, `- key: value`, `~ key: old -> new`."""

    def v(x: Any) -> str:
        return json.dumps(x, ensure_ascii=False, sort_keys=True)

    out = [f"+ {k}: {v(x)}" for k, x in meta["added"].items()]
    out += [f"- {k}: {v(x)}" for k, x in meta["removed"].items()]
    out += [f"~ {k}: {v(a)} -> {v(b)}" for k, (a, b) in meta["changed"].items()]
    return out


# ---- the history of a checkpoint


def version_log(store: Any, specs: list[str]) -> dict[str, Any]:
    """Each version of each checkpoint under `specs` (git pathspecs from the top; none: all) in
    HEAD's history, newest first: commit, date, subject, size, stored bytes, the bytes of frames
    the previous version of that path lacks, and the summary against it (manifests and frame
    headers only: no tensor is read)."""
    from .deltas import between_versions
    from .history import pointer_writes
    from .plan import load_manifest

    if not store.has_revision("HEAD"):
        return {"files": []}
    writes = pointer_writes(store, ["HEAD", "--", *specs], oldest_first=True)
    subjects: dict[str, str] = {}
    if writes:
        listing = store.git(
            "log", "--no-walk=unsorted", "--stdin", "--format=%H%x00%s", input="\n".join({w.commit for w in writes}).encode() + b"\n"
        )
        for line in listing.decode(errors="replace").splitlines():
            oid, _, subject = line.partition("\0")
            subjects[oid] = subject
    files: dict[str, list[dict[str, Any]]] = {}
    last: dict[str, tuple[bytes, dict[bytes, Any]]] = {}
    for w in writes:
        entry: dict[str, Any] = {"commit": w.commit, "date": w.date, "subject": subjects.get(w.commit, ""), "version": w.version.hex()}
        try:
            m = load_manifest(store, w.version)
            frames = store.version_frames(w.version)
        except ThetaStoreError as e:  # a version this repository never fetched
            entry.update(size=0, stored=0, added=0, summary=None, summary_line=f"(version not here: {e.args[0]})")
            files.setdefault(w.path, []).append(entry)
            continue
        prev = last.get(w.path)
        entry.update(size=m.file_size, stored=sum(frames[c].frame_len for c in m.chunk_ids() if c in frames))
        entry["added"] = sum(f.frame_len for cid, f in frames.items() if prev is None or cid not in prev[1])
        if prev is None:
            entry.update(summary=None, summary_line=f"added: {len(m.tensors)} tensors")
        elif prev[0] == w.version:
            entry.update(summary=None, summary_line="unchanged (the same version)")
        else:
            sm = between_versions(store, w.path, prev[0], w.version).summary()
            entry.update(summary=sm, summary_line=summary_line(sm))
        last[w.path] = (w.version, frames)
        files.setdefault(w.path, []).append(entry)
    return {"files": [{"path": p, "versions": vs[::-1]} for p, vs in sorted(files.items())]}


# ---- the picture: relative change by layer and module


def _grid(deltas: Any, tensors: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows (layers, in order), columns (module kinds, in order of appearance) and per cell the
    relative change of its changed tensors, sqrt(sum |dW|^2) / sqrt(sum |W|^2): None if none
    changed, "new" if one was added. Tensors outside numbered layers are listed apart."""
    layers: dict[str, tuple[str, int]] = {}
    modules: dict[str, None] = {}
    for name in deltas:
        layer, module = layer_module(name)
        if layer is not None:
            prefix, _, idx = layer.rpartition(".")
            layers.setdefault(layer, (prefix, int(idx)))
            modules.setdefault(module, None)
    acc: dict[tuple[str | None, str], list[float]] = {}
    for t in tensors:
        if t["kind"] == "unchanged":
            continue
        key = (t["layer"], t["module"])
        a = acc.setdefault(key, [0.0, 0.0, 0.0])
        st = t["stats"]
        if t["kind"] in ("added", "reshaped") or st.get("norm_delta") is None:
            a[2] = 1.0
        else:
            a[0] += st["norm_delta"] ** 2
            a[1] += (st.get("norm_base") or 0.0) ** 2

    def value(key: tuple[str | None, str]) -> float | str | None:
        a = acc.get(key)
        if a is None:
            return None
        if a[2] or not a[1]:
            return "new" if a[2] or a[0] else 0.0
        return math.sqrt(a[0]) / math.sqrt(a[1])

    rows = sorted(layers, key=lambda k: layers[k])
    cols = list(modules)
    cells = [[value((r, c)) for c in cols] for r in rows]
    outside = [{"name": m, "rel": value((None, m))} for (layer, m) in acc if layer is None]
    return {"rows": rows, "columns": cols, "labels": short_labels(cols), "cells": cells, "outside": outside}


def short_labels(cols: list[str]) -> list[str]:
    """Each module's shortest dotted suffix that no other column ends with."""
    out = []
    for c in cols:
        parts = c.split(".")
        for i in range(len(parts) - 1, -1, -1):
            label = ".".join(parts[i:])
            if not any(o != c and (o == label or o.endswith("." + label)) for o in cols):
                break
        out.append(label)
    return out


def shade(rel: float | str | None) -> str:
    """The block shade of a cell: blank unchanged, then by decade of relative change."""
    if rel is None:
        return SHADES[0]
    if rel == "new":
        return SHADES[4]
    assert isinstance(rel, float)
    return SHADES[1 + sum(rel >= e for e in SHADE_EDGES)]


def strip(report: dict[str, Any]) -> list[str]:
    """The terminal picture of a file's change: a row per layer, a column (lettered, legend
    below) per module kind, a shaded cell each; tensors outside the layers on one line."""
    g = report["layers"]
    lines = []
    if g["rows"]:
        letters = [_letter(i) for i in range(len(g["columns"]))]
        width = max(len(r) for r in g["rows"])
        lines.append(" " * width + "  " + " ".join(f"{x:<2}" for x in letters).rstrip())
        for r, cells in zip(g["rows"], g["cells"], strict=True):
            lines.append(f"{r:>{width}}  " + " ".join(shade(c) * 2 for c in cells).rstrip())
        lines.append("  ".join(f"{x} {label}" for x, label in zip(letters, g["labels"], strict=True)))
    changed_outside = [o for o in g["outside"] if o["rel"] is not None]
    if changed_outside:
        lines.append("outside the layers: " + "  ".join(f"{shade(o['rel']) * 2} {o['name']}" for o in changed_outside))
    if lines:
        lines.append("relative change |dW|/|W|: ' ' unchanged  ░ <1e-3  ▒ <1e-2  ▓ <1e-1  █ >=1e-1 or new")
    return lines


def _letter(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = chr(ord("a") + r) + s
    return s


def render_text(report: dict[str, Any], table: Any, *, picture: bool = False) -> list[str]:
    """A file's diff as text: the summary line, metadata changes, the table (drawn by `table`,
    the CLI's table maker), and the strip."""
    lines = [f"{report['path']}: {report['summary_line']}"]
    lines += [f"  {report['metadata_label']} {m}" for m in metadata_lines(report["metadata"])]
    rows = table_rows(report)
    if rows:
        lines += ["  " + line for line in table(rows, TABLE_HEADER).splitlines()]
    if picture:
        lines += ["  " + line for line in strip(report)]
    return lines


# ---- the HTML page

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;white-space:nowrap;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left;font-family:monospace}
.legend span{display:inline-block;width:28px;height:12px;margin-right:2px}
svg text{font:11px monospace}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('theta-data').textContent);
  function color(v){
    if(v===null) return '#f4f4f4';
    if(v==='new') return '#67000d';
    var x = Math.max(0, Math.min(1, (Math.log10(Math.max(v,1e-7)) + 7) / 7));
    var r = Math.round(255 - x * (255 - 103)), g = Math.round(245 - x * 245), b = Math.round(240 - x * (240 - 13));
    return 'rgb(' + r + ',' + g + ',' + b + ')';
  }
  var ns = 'http://www.w3.org/2000/svg', total = 0;
  data.files.forEach(function(f, fi){
    var host = document.getElementById('heatmap-' + fi), g = f.layers;
    if(!host || !g.rows.length) return;
    var longest = function(xs){ return Math.max.apply(null, xs.map(function(x){ return x.length; })); };
    var cw = 34, ch = 16, left = 8 + 7 * longest(g.rows), top = 8 + 7 * longest(g.labels);
    var svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('width', left + cw * g.columns.length + 10); svg.setAttribute('height', top + ch * g.rows.length + 10);
    g.labels.forEach(function(c, j){
      var t = document.createElementNS(ns, 'text'); t.textContent = c;
      t.setAttribute('transform', 'translate(' + (left + j * cw + cw / 2 + 4) + ',' + (top - 4) + ') rotate(-90)');
      svg.appendChild(t);
    });
    g.rows.forEach(function(r, i){
      var t = document.createElementNS(ns, 'text'); t.textContent = r; t.setAttribute('x', 2); t.setAttribute('y', top + i * ch + 12);
      svg.appendChild(t);
      g.cells[i].forEach(function(v, j){
        var rect = document.createElementNS(ns, 'rect');
        rect.setAttribute('class', 'cell'); rect.setAttribute('x', left + j * cw); rect.setAttribute('y', top + i * ch);
        rect.setAttribute('width', cw - 2); rect.setAttribute('height', ch - 2); rect.setAttribute('fill', color(v));
        rect.setAttribute('data-rel', v === null ? '' : String(v));
        var tip = document.createElementNS(ns, 'title');
        tip.textContent = r + ' ' + g.columns[j] + ': ' + (v === null ? 'unchanged' : v === 'new' ? 'new' : v.toExponential(2));
        rect.appendChild(tip); svg.appendChild(rect); total++;
      });
    });
    host.appendChild(svg);
  });
  document.body.setAttribute('data-cells', String(total));
  document.body.setAttribute('data-rendered', 'yes');
})();
"""


def render_html(reports: list[dict[str, Any]], title: str) -> str:
    """One self-contained page (inline CSS, data and script; nothing fetched): per file the
    summary, a heatmap of relative change by layer and module (drawn by the inline script as
    SVG), the metadata changes and the per-tensor table."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{e(title)}</h1>")
    parts.append(
        "<p class='legend'>Relative change |&Delta;W|/|W| per layer (row) and module (column), log scale: "
        "<span style='background:rgb(255,245,240)'></span>1e-7 &hellip; <span style='background:rgb(103,0,13)'></span>1 or new;"
        " grey: unchanged.</p>"
    )
    for i, r in enumerate(reports):
        parts.append(f"<h2>{e(r['path'])}</h2><p>{e(r.get('summary_line') or r.get('status', ''))}</p>")
        if "layers" not in r:
            continue
        parts.append(f"<div class='heatmap' id='heatmap-{i}'></div>")
        meta = metadata_lines(r["metadata"])
        if meta:
            parts.append(f"<p>{e(r['metadata_label'])}:</p><ul>" + "".join(f"<li><code>{e(m)}</code></li>" for m in meta) + "</ul>")
        rows = table_rows(r)
        if rows:
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in TABLE_HEADER) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
    data = {
        "files": [{"path": r["path"], "layers": r.get("layers", {"rows": [], "columns": [], "labels": [], "cells": []})} for r in reports]
    }
    # "</" cannot appear inside the script element: JSON escapes it away.
    blob = json.dumps(data).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='theta-data'>{blob}</script><script>{_JS}</script></body></html>")
    return "".join(parts)
