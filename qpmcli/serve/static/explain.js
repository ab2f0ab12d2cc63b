// Explain page: upload (or drop) an image, or open a test image (?test=N), POST it to /api/explain and draw the answer
// with DOM calls only. Colours, labels and the head kind come from the server (the CLI figures' rule).
(function () {
  "use strict";
  var Q = window.qpm, el = Q.el, clear = Q.clear, fmt = Q.fmt, signed = Q.signed, sig = Q.sig;
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var explainSel = document.getElementById("explain-class");
  var compareSel = document.getElementById("compare-class");
  var opacity = document.getElementById("opacity");
  var status = document.getElementById("status");
  var result = document.getElementById("result");
  var file = null, photoUrl = null, pending = 0, last = null;

  function setStatus(text, isError) { status.textContent = text; status.className = isError ? "error" : "note"; }
  function classLink(index, name) { return el("a", {href: "/class/" + Number(index)}, name); }
  function weightText(w, head) { return head === "binary" ? signed(w, 0) : (w >= 0 ? "+" : "") + sig(w, 3); }

  function prototypes(f) {
    var box = el("div", {"class": "protos"});
    if (!f.prototypes || !f.prototypes.length) { box.appendChild(el("p", {"class": "note"}, "no prototypes stored")); return box; }
    f.prototypes.slice(0, 4).forEach(function (p) { box.appendChild(Q.proto(p, f.colour, f.label)); });
    return box;
  }

  function card(f, heat, tag, tagClass, head) {
    var row = el("section", {"class": "card", "data-feature": String(f.feature)});
    row.style.borderTopColor = f.colour;
    var info = el("div", {"class": "info"});
    info.appendChild(Q.chip(f));
    if (tag) info.appendChild(el("span", {"class": "tag " + tagClass}, tag));
    info.appendChild(el("div", null, "contribution " + signed(f.contribution, 3)));
    info.appendChild(el("div", {"class": "note"}, "activation " + sig(f.activation, 3) + " (mean over patches)" +
      (f.zscore === null ? "" : ", z " + signed(f.zscore, 2))));
    info.appendChild(el("div", {"class": "note"}, "peak " + sig(f.peak, 3) + " · weight " + weightText(f.weight, head)));
    row.appendChild(info);
    var stack = el("div", {"class": "stack"});
    stack.appendChild(el("img", {"class": "photo", src: photoUrl, alt: "the image"}));
    if (heat) stack.appendChild(el("img", {"class": "heat", src: heat, alt: "where " + f.label + " fires"}));
    row.appendChild(stack);
    var side = el("div", {"class": "side"});
    side.appendChild(el("div", {"class": "note"}, "what " + f.label + " responds to in training images:"));
    side.appendChild(prototypes(f));
    row.appendChild(side);
    return row;
  }

  function bar(value, maxAbs, width) {
    var b = el("span", {"class": value < 0 ? "bar neg" : "bar"});
    b.style.width = Math.max(1, Math.round(width * Math.abs(value) / maxAbs)) + "px";
    return b;
  }

  function render(data) {
    last = data;
    var head = data.head;
    document.getElementById("photo").src = photoUrl;
    var top = document.getElementById("topk");
    clear(top);
    var hr = el("tr");
    ["class", "probability", ""].forEach(function (h) { hr.appendChild(el("th", null, h)); });
    top.appendChild(hr);
    data.top_k.forEach(function (t) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(classLink(t.index, t["class"]));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, (100 * t.probability).toFixed(1) + " %"));
      var cell = el("td");
      cell.appendChild(bar(t.probability, 1, 120));
      tr.appendChild(cell);
      top.appendChild(tr);
    });

    var ex = data.explained;
    document.getElementById("why-title").textContent = "Why " + ex["class"] +
      (ex.index === data.predicted.index ? "" : " (predicted: " + data.predicted["class"] + ")");
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
      td.appendChild(Q.chip(f));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, sig(f.activation, 3)));
      tr.appendChild(el("td", {"class": "num"}, f.zscore === null ? "" : signed(f.zscore, 2)));
      tr.appendChild(el("td", {"class": "num"}, weightText(f.weight, head)));
      tr.appendChild(el("td", {"class": "num"}, signed(f.contribution, 3)));
      var cell = el("td");
      cell.appendChild(bar(f.contribution, maxAbs, 90));
      tr.appendChild(cell);
      table.appendChild(tr);
    });
    var rest = ex.logit - ex.bias - total;
    document.getElementById("logit-line").textContent = head === "dense" ?
      "A dense head: every feature counts. logit " + fmt(ex.logit, 3) + " = bias " + fmt(ex.bias, 3) + " + these " +
        ex.features.length + " (largest |contribution|) " + signed(total, 3) + " + all the others " + signed(rest, 3) + "." :
      "logit " + fmt(ex.logit, 3) + " = bias " + fmt(ex.bias, 3) + " + sum of contributions " + fmt(total, 3) +
        (ex.features.length ? "" : " (no features)") + (head === "binary" ? " (each contribution is the feature's z-score)." : ".");
    Q.colourbar(data.heatmap_scale);
    predictionSet(data.set);

    var cmp = data.compare, sharedSet = {}, onlySet = {};
    if (cmp) {
      cmp.shared.forEach(function (f) { sharedSet[f] = true; });
      cmp.only_explained.forEach(function (f) { onlySet[f] = true; });
    }
    var feats = document.getElementById("features");
    clear(feats);
    ex.features.forEach(function (f) {
      var tag = null, cls = "";
      if (cmp && sharedSet[f.feature]) { tag = head === "dense" ? "also shown for " + cmp["class"] : "shared with " + cmp["class"]; cls = "shared"; }
      else if (cmp && onlySet[f.feature]) { tag = "only " + ex["class"]; cls = "only"; }
      feats.appendChild(card(f, data.heatmaps ? data.heatmaps[String(f.feature)] : null, tag, cls, head));
    });

    var section = document.getElementById("comparison");
    var cfeats = document.getElementById("compare-features");
    var diff = document.getElementById("difference");
    clear(cfeats);
    clear(diff);
    if (!cmp) { section.hidden = true; return; }
    section.hidden = false;
    document.getElementById("compare-title").textContent = ex["class"] + " vs " + cmp["class"];
    var labels = {};
    ex.features.concat(cmp.features).forEach(function (f) { labels[f.feature] = f.label; });
    function names(ids) { return ids.map(function (i) { return labels[i] || ("f" + i); }).join(", ") || "none"; }
    var summary = document.getElementById("compare-summary");
    clear(summary);
    var lead = "Logit difference " + signed(cmp.logit_difference, 3) + " (" + cmp["class"] + ": probability " +
      (100 * cmp.probability).toFixed(1) + " %). ";
    if (cmp.shared_cancel && head !== "dense") {
      lead += "Shared features add the same to both logits and cancel in the difference: " + names(cmp.shared) +
        ". Deciding for " + ex["class"] + ": " + names(cmp.only_explained) + ". Deciding for " + cmp["class"] + ": " +
        names(cmp.only_compared) + ".";
    } else {
      lead += "Each feature moves the difference by (W[" + ex["class"] + "] − W[" + cmp["class"] + "]) × its " +
        "standardised activation; with real-valued weights a feature both classes use counts too. Shown for both: " +
        names(cmp.shared) + ".";
    }
    summary.appendChild(document.createTextNode(lead));
    var dh = el("tr");
    ["feature", "share of the logit difference", ""].forEach(function (h) { dh.appendChild(el("th", null, h)); });
    diff.appendChild(dh);
    var colours = {};
    ex.features.concat(cmp.features).forEach(function (f) { colours[f.feature] = f.colour; });
    var dmax = Math.max.apply(null, cmp.difference.map(function (d) { return Math.abs(d.delta); }).concat([1e-9]));
    cmp.difference.slice().sort(function (a, b) { return b.delta - a.delta; }).forEach(function (d) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(Q.chip(Object.assign({}, d, {colour: colours[d.feature]})));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, d.delta === 0 ? "0 (cancels)" :
        fmt(Math.abs(d.delta), 3) + " for " + (d.delta > 0 ? ex["class"] : cmp["class"])));
      var cell = el("td");
      cell.appendChild(bar(d.delta, dmax, 90));
      tr.appendChild(cell);
      diff.appendChild(tr);
    });
    cmp.features.forEach(function (f) {
      if (sharedSet[f.feature]) return;  // drawn above already
      cfeats.appendChild(card(f, data.heatmaps ? data.heatmaps[String(f.feature)] : null, "only " + cmp["class"], "only", head));
    });
  }

  function predictionSet(ps) {  // conformal prediction set (qpm conformal), when the model carries a calibration
    var section = document.getElementById("set-section"), table = document.getElementById("set-table");
    clear(table);
    if (!ps) { section.hidden = true; return; }
    section.hidden = false;
    document.getElementById("set-title").textContent = (100 * ps.coverage).toFixed(0) + " % prediction set: " +
      ps.size + (ps.size === 1 ? " class" : " classes");
    document.getElementById("set-summary").textContent = "Score " + ps.score + (ps.level !== null && ps.level !== undefined ? ", level " + ps.level : "") +
      (ps.per_class ? ", calibrated per class" : "") + ". " + (ps.guarantee ? "Calibrated on held-out images: the set holds the true class with at least this probability." :
      "Calibrated on training images: no coverage guarantee.") +
      (ps.shared_features && ps.shared_features.length ? " Every member ranks first: " + ps.shared_features.map(function (f) { return (ps.feature_labels || {})[String(f)] || ("f" + f); }).join(", ") + "." : "");
    var hr = el("tr");
    ["class", "probability", "its features on this image, by contribution"].forEach(function (h) { hr.appendChild(el("th", null, h)); });
    table.appendChild(hr);
    ps.members.forEach(function (m) {
      var tr = el("tr"), td = el("td");
      td.appendChild(classLink(m.index, m["class"]));
      tr.appendChild(td);
      tr.appendChild(el("td", {"class": "num"}, (100 * m.probability).toFixed(1) + " %"));
      var feats = el("td");
      (m.ranking || []).forEach(function (f, i) {
        if (i) feats.appendChild(document.createTextNode(" › "));
        feats.appendChild(Q.chip({feature: f, label: (ps.feature_labels || {})[String(f)] || ("f" + f)}));
      });
      tr.appendChild(feats);
      table.appendChild(tr);
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

  // one PNG with the image and every feature's heatmap, labelled in the features' colours
  function figure() {
    if (!last) return;
    var ex = last.explained, feats = ex.features.slice();
    if (last.compare) last.compare.features.forEach(function (f) { if (!feats.some(function (g) { return g.feature === f.feature; })) feats.push(f); });
    var tile = 260, pad = 14, titleH = 46, cols = Math.min(feats.length + 1, 4), rows = Math.ceil((feats.length + 1) / cols);
    var canvas = el("canvas");
    canvas.width = cols * (tile + pad) + pad;
    canvas.height = rows * (tile + titleH + pad) + pad + 40;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#1d2330";
    ctx.font = "bold 16px sans-serif";
    ctx.fillText(Q.ellipsize(ctx, (file.name || "image") + " → " + ex["class"] + " (p = " + ex.probability.toFixed(3) + ")" +
      (last.compare ? " vs " + last.compare["class"] : ""), canvas.width - 2 * pad), pad, 26);
    var jobs = [Q.loadImage(photoUrl)].concat(feats.map(function (f) { return Q.loadImage(last.heatmaps[String(f.feature)]); }));
    Promise.all(jobs).then(function (imgs) {
      imgs.forEach(function (img, i) {
        var x = pad + (i % cols) * (tile + pad), y = 40 + pad + Math.floor(i / cols) * (tile + titleH + pad);
        var s = Math.min(tile / imgs[0].naturalWidth, tile / imgs[0].naturalHeight);
        var w = imgs[0].naturalWidth * s, h = imgs[0].naturalHeight * s;
        ctx.drawImage(imgs[0], x, y + titleH, w, h);
        ctx.font = "13px sans-serif";
        ctx.fillStyle = "#1d2330";
        if (i === 0) { ctx.fillText("input", x, y + titleH - 8); return; }
        var f = feats[i - 1];
        ctx.globalAlpha = Number(opacity.value) / 100;
        ctx.drawImage(img, x, y + titleH, w, h);
        ctx.globalAlpha = 1;
        ctx.strokeStyle = f.colour;
        ctx.lineWidth = 5;
        ctx.strokeRect(x, y + titleH, w, h);
        ctx.fillStyle = f.colour;
        ctx.fillRect(x, y + 6, 14, 14);
        ctx.fillStyle = "#1d2330";
        ctx.font = "bold 13px sans-serif";
        ctx.fillText(Q.ellipsize(ctx, f.label, tile - 20), x + 20, y + 18);
        ctx.font = "12px sans-serif";
        ctx.fillText("contribution " + signed(f.contribution, 2) + ", activation " + sig(f.activation, 3), x, y + 36);
      });
      Q.downloadCanvas(canvas, "explain-" + (file.name || "image").replace(/[^\w.-]+/g, "_") + ".png");
    }).catch(function (err) { setStatus("The figure could not be drawn: " + err, true); });
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
  document.getElementById("explain-form").addEventListener("submit", function (ev) { ev.preventDefault(); run(); });
  document.getElementById("json-download").addEventListener("click", function () {
    if (last) Q.downloadJSON(last, "explain-" + (file.name || "image").replace(/[^\w.-]+/g, "_") + ".json");
  });
  document.getElementById("figure-download").addEventListener("click", figure);
  function applyOpacity() { document.documentElement.style.setProperty("--heat-opacity", String(opacity.value / 100)); }
  opacity.addEventListener("input", applyOpacity);
  applyOpacity();

  var params = new URLSearchParams(window.location.search);
  if (params.has("class")) explainSel.value = params.get("class");
  if (params.has("compare")) compareSel.value = params.get("compare");
  if (params.has("test") && /^\d{1,9}$/.test(params.get("test"))) {  // a test image, e.g. from /misclassified
    var n = params.get("test");
    setStatus("Loading test image " + n + "…", false);
    fetch("/api/test-images/" + n + ".png").then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.blob();
    }).then(function (b) { useFile(new File([b], "test image " + n + ".png", {type: "image/png"})); })
      .catch(function (err) { setStatus("Test image " + n + " could not be loaded: " + err, true); });
  }
})();
