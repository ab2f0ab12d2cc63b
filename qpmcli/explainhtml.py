"""The self-contained HTML report of ``qpm explain --html``: every figure of :func:`qpmcli.explain.explain`'s summary
embedded as a data URI, with each image's contributions table (activation: a feature's spatial mean)."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any


def _data_uri(path: str | os.PathLike[str]) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1700px}
h1{font-size:22px} h2{font-size:18px;margin-top:36px;border-bottom:1px solid #ccc;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left} img.fig{max-width:100%;border:1px solid #eee}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:middle}
.meta{color:#555;font-size:13px}
"""


def render_html(summary: dict[str, Any], path: str | os.PathLike[str], title: str = "qpm explain") -> Path:
    """One self-contained HTML report from :func:`explain`'s summary: every figure embedded as a data URI."""
    from qpmcli.artifact import atomic_write_text


    labels = summary.get("feature_labels") or {}  # {feature id: ClassifierMetadata.feature_label}, from explain()

    def label(fid: int) -> str:
        return str(labels.get(str(fid)) or f"f{fid}")

    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
             f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
             f"<p class=\"meta\">model: {esc(str(summary.get('model', '')))} &middot; backbone: "
             f"{esc(str(summary.get('backbone', '')))} &middot; {len(summary.get('images', []))} image(s)</p>\n"]
    glob = summary.get("global")
    if glob:
        parts.append(f"<h2>Class {esc(glob['class'])}: global explanation</h2>\n"
                     f"<p>Features {esc(', '.join(label(f) for f in glob['features']))}, each shown by the training "
                     f"patches that activate it most.</p>\n"
                     f"<img class=\"fig\" src=\"{_data_uri(glob['figure'])}\" alt=\"global explanation of "
                     f"{esc(glob['class'])}\">\n")
    for item in summary.get("images", []):
        if "error" in item:
            parts.append(f"<h2>{esc(Path(item['image']).name)}</h2>\n<p class=\"meta\">skipped: "
                         f"{esc(item['error'])}</p>\n")
            continue
        parts.append(f"<h2>{esc(Path(item['image']).name)}</h2>\n<p>{esc(item['class_name'])} &mdash; "
                     f"probability {item['probability']:.3f}, logit {item['logit']:+.3f}"
                     + ("" if item["class_index"] == item["predicted_index"]
                        else f" (predicted: {esc(item['predicted_name'])})") + "</p>\n")
        parts.append("<table><tr><th class=\"l\">feature</th><th>activation</th><th>z</th><th>weight</th>"
                     "<th>contribution</th></tr>\n")
        for e in item["features"]:
            z = "" if e["zscore"] is None else f"{e['zscore']:+.3f}"
            parts.append(f"<tr><td class=\"l\"><span class=\"sw\" style=\"background:{e.get('colour') or '#000'}\">"
                         f"</span>{esc(e.get('label') or label(e['feature']))}</td><td>{e['activation']:.4f}</td>"
                         f"<td>{z}</td>"
                         f"<td>{e['weight']:+g}</td><td>{e['contribution']:+.3f}</td></tr>\n")
        parts.append("</table>\n<table><tr><th class=\"l\">runner-ups</th><th>probability</th></tr>\n")
        for t in item["top"]:
            parts.append(f"<tr><td class=\"l\">{esc(t['class'])}</td><td>{t['probability']:.3f}</td></tr>\n")
        parts.append("</table>\n")
        if item.get("figure"):
            parts.append(f"<img class=\"fig\" src=\"{_data_uri(item['figure'])}\" alt=\"local explanation of "
                         f"{esc(Path(item['image']).name)}\">\n")
        if item.get("set"):
            ps = item["set"]
            parts.append(f"<h3>{100 * ps['coverage']:g}% prediction set ({esc(ps['score'])}): "
                         f"{esc(', '.join(ps['set'])) or 'empty'}</h3>\n<img class=\"fig\" "
                         f"src=\"{_data_uri(ps['figure'])}\" alt=\"prediction set\">\n")
        cmp_ = item.get("compare")
        if cmp_ and "skipped" in cmp_:
            parts.append(f"<p class=\"meta\">no contrastive view: {esc(cmp_['skipped'])}</p>\n")
        elif cmp_:
            def listed(ids: list[int]) -> str:
                return esc(", ".join(label(f) for f in ids)) or "none"

            parts.append(f"<h3>{esc(cmp_['class_a'])} vs {esc(cmp_['class_b'])}</h3>\n<p>shared features: "
                         f"{listed(cmp_['shared'])}; only {esc(cmp_['class_a'])}: "
                         f"{listed(cmp_['only_a'])}; only {esc(cmp_['class_b'])}: "
                         f"{listed(cmp_['only_b'])}</p>\n"
                         f"<img class=\"fig\" src=\"{_data_uri(cmp_['figure'])}\" alt=\"contrastive explanation\">\n")
    parts.append("</body>\n</html>\n")
    return atomic_write_text(path, "".join(parts))


__all__ = ["render_html"]
