// Explain page: upload (or drop) an image, POST it to /api/explain, draw the answer with DOM calls only (textContent,
// never innerHTML), so class names from folder names can never become markup or script.
(function () {
  "use strict";
  var form = document.getElementById("explain-form");
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var explainSel = document.getElementById("explain-class");
  var compareSel = document.getElementById("compare-class");
  var opacity = document.getElementById("opacity");
  var status = document.getElementById("status");
  var result = document.getElementById("result");
  var file = null;
  var photoUrl = null;
  var pending = 0;

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(x, digits) { return (x === null || x === undefined) ? "" : Number(x).toFixed(digits); }
  function signed(x, digits) { return (x >= 0 ? "+" : "") + fmt(x, digits); }
  function classLink(index, name) { return el("a", {href: "/class/" + Number(index)}, name); }
  function featureLink(fid) { return el("a", {href: "/feature/" + Number(fid), "class": "feature-link"}, "feature " + fid); }

  // the same stable colour per feature id as the static figures (golden-ratio hue steps)
  function featureColour(fid) {
    var h = (fid * 0.6180339887498949 + 0.11) % 1.0;
    var v = [0.92, 0.62, 0.78][fid % 3];
    var s = [0.78, 0.95, 0.62][Math.floor(fid / 3) % 3];
    var i = Math.floor(h * 6), f = h * 6 - i, p = v * (1 - s), q = v * (1 - s * f), t = v * (1 - s * (1 - f));
    var rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
    return "rgb(" + rgb.map(function (c) { return Math.round(c * 255); }).join(",") + ")";
  }
  function swatch(fid) { var s = el("span", {"class": "swatch"}); s.style.background = featureColour(fid); return s; }

  function setStatus(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "note";
  }

  function prototypes(list) {
    var box = el("div", {"class": "protos"});
    if (!list || !list.length) { box.appendChild(el("p", {"class": "note"}, "no prototypes stored")); return box; }
    list.forEach(function (p) {
      var fig = el("figure");
      var img = el("img", {src: p.url, alt: "training prototype"});
      img.title = p["class"] + " (activation " + fmt(p.activation, 2) + ")";
      fig.appendChild(img);
      fig.appendChild(el("figcaption", null, p["class"]));
      box.appendChild(fig);
    });
    return box;
  }

  function card(feat, heat, tag, tagClass) {
    var row = el("section", {"class": "card", "data-feature": String(feat.feature)});
    var info = el("div", {"class": "info"});
    var title = featureLink(feat.feature);
    title.insertBefore(swatch(feat.feature), title.firstChild);
    info.appendChild(title);
    if (tag) info.appendChild(el("span", {"class": "tag " + tagClass}, tag));
    info.appendChild(el("div", null, "contribution " + signed(feat.contribution, 3)));
    info.appendChild(el("div", {"class": "note"}, "activation " + fmt(feat.activation, 4) +
      (feat.zscore === null ? "" : ", z " + signed(feat.zscore, 2)) + ", weight " + signed(feat.weight, 0)));
    row.appendChild(info);
    var stack = el("div", {"class": "stack"});
    stack.appendChild(el("img", {"class": "photo", src: photoUrl, alt: "uploaded image"}));
    if (heat) stack.appendChild(el("img", {"class": "heat", src: heat, alt: "heatmap of feature " + feat.feature}));
    row.appendChild(stack);
    var side = el("div");
    side.appendChild(el("div", {"class": "note"}, "what feature " + feat.feature + " responds to in training images:"));
    side.appendChild(prototypes(feat.prototypes));
    row.appendChild(side);
    return row;
  }

  function render(data) {
    var top = document.getElementById("topk");
    clear(top);
    var head = el("tr");
    ["class", "probability", ""].forEach(function (h) { head.appendChild(el("th", null, h)); });
    top.appendChild(head);
    data.top_k.forEach(function (t) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(classLink(t.index, t["class"]));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, (100 * t.probability).toFixed(1) + " %"));
      var barCell = el("td");
      var bar = el("span", {"class": "bar"});
      bar.style.width = Math.max(1, Math.round(160 * t.probability)) + "px";
      barCell.appendChild(bar);
      tr.appendChild(barCell);
      top.appendChild(tr);
    });

    var ex = data.explained;
    var why = document.getElementById("why-title");
    why.textContent = "Why " + ex["class"] + (ex.index === data.predicted.index ? "" : " (predicted: " + data.predicted["class"] + ")");
    var table = document.getElementById("contributions");
    clear(table);
    var h2 = el("tr");
    ["feature", "activation", "z", "weight", "contribution", ""].forEach(function (h) { h2.appendChild(el("th", null, h)); });
    table.appendChild(h2);
    var maxAbs = Math.max.apply(null, ex.features.map(function (f) { return Math.abs(f.contribution); }).concat([1e-9]));
    var total = 0;
    ex.features.forEach(function (f) {
      total += f.contribution;
      var tr = el("tr");
      var td = el("td");
      td.appendChild(swatch(f.feature));
      td.appendChild(el("a", {href: "/feature/" + Number(f.feature)}, String(f.feature)));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, fmt(f.activation, 4)));
      tr.appendChild(el("td", {"class": "num"}, f.zscore === null ? "" : signed(f.zscore, 2)));
      tr.appendChild(el("td", {"class": "num"}, signed(f.weight, 0)));
      tr.appendChild(el("td", {"class": "num"}, signed(f.contribution, 3)));
      var barCell = el("td");
      var bar = el("span", {"class": f.contribution < 0 ? "bar neg" : "bar"});
      bar.style.width = Math.max(1, Math.round(100 * Math.abs(f.contribution) / maxAbs)) + "px";
      barCell.appendChild(bar);
      tr.appendChild(barCell);
      table.appendChild(tr);
    });
    document.getElementById("logit-line").textContent = "logit " + fmt(ex.logit, 3) + " = bias " + fmt(ex.bias, 3) +
      " + sum of contributions " + fmt(total, 3) + (ex.features.length ? "" : " (no features)");

    var cmp = data.compare;
    var sharedSet = {}, onlySet = {};
    if (cmp) {
      cmp.shared.forEach(function (f) { sharedSet[f] = true; });
      cmp.only_explained.forEach(function (f) { onlySet[f] = true; });
    }
    var feats = document.getElementById("features");
    clear(feats);
    ex.features.forEach(function (f) {
      var tag = null, cls = "";
      if (cmp && sharedSet[f.feature]) { tag = "shared with " + cmp["class"]; cls = "shared"; }
      else if (cmp && onlySet[f.feature]) { tag = "only " + ex["class"]; cls = "only"; }
      feats.appendChild(card(f, data.heatmaps ? data.heatmaps[String(f.feature)] : null, tag, cls));
    });

    var section = document.getElementById("comparison");
    var cfeats = document.getElementById("compare-features");
    clear(cfeats);
    if (!cmp) { section.hidden = true; return; }
    section.hidden = false;
    var title = document.getElementById("compare-title");
    title.textContent = ex["class"] + " vs " + cmp["class"];
    var summary = document.getElementById("compare-summary");
    clear(summary);
    summary.appendChild(document.createTextNode(
      "Logit difference " + signed(cmp.logit_difference, 3) + " (" + cmp["class"] + ": probability " +
      (100 * cmp.probability).toFixed(1) + " %). Shared features, which cancel in the difference: " +
      (cmp.shared.join(", ") || "none") + ". Deciding for " + ex["class"] + ": " + (cmp.only_explained.join(", ") || "none") +
      ". Deciding for " + cmp["class"] + ": " + (cmp.only_compared.join(", ") || "none") + "."));
    cmp.features.forEach(function (f) {
      if (sharedSet[f.feature]) return;  // drawn above already
      cfeats.appendChild(card(f, data.heatmaps ? data.heatmaps[String(f.feature)] : null, "only " + cmp["class"], "only"));
    });
  }

  function run() {
    if (!file) return;
    var body = new FormData();
    body.append("file", file, file.name || "upload");
    if (explainSel.value !== "") body.append("class", explainSel.value);
    if (compareSel.value !== "") body.append("compare", compareSel.value);
    body.append("heatmaps", "png");
    var ticket = ++pending;
    setStatus("Explaining " + (file.name || "the image") + "…", false);
    fetch("/api/explain", {method: "POST", body: body}).then(function (resp) {
      return resp.json().catch(function () { return {detail: "HTTP " + resp.status}; }).then(function (data) {
        return {ok: resp.ok, status: resp.status, data: data};
      });
    }).then(function (r) {
      if (ticket !== pending) return;  // a newer request is on its way
      if (!r.ok) {
        var detail = typeof r.data.detail === "string" ? r.data.detail : JSON.stringify(r.data.detail);
        setStatus("Error " + r.status + ": " + detail, true);
        result.hidden = true;
        return;
      }
      setStatus((file.name || "image") + ": " + r.data.predicted["class"], false);
      render(r.data);
      result.hidden = false;
    }).catch(function (err) {
      if (ticket === pending) setStatus("The server did not answer: " + err, true);
    });
  }

  function useFile(f) {
    if (!f) return;
    file = f;
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(f);
    run();
  }

  input.addEventListener("change", function () { useFile(input.files[0]); });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (ev) { ev.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (ev) { ev.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (ev) {
    if (ev.dataTransfer && ev.dataTransfer.files.length) useFile(ev.dataTransfer.files[0]);
  });
  explainSel.addEventListener("change", run);
  compareSel.addEventListener("change", run);
  form.addEventListener("submit", function (ev) { ev.preventDefault(); run(); });
  function applyOpacity() { document.documentElement.style.setProperty("--heat-opacity", String(opacity.value / 100)); }
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();

  var params = new URLSearchParams(window.location.search);
  if (params.has("class")) explainSel.value = params.get("class");
  if (params.has("compare")) compareSel.value = params.get("compare");
})();
