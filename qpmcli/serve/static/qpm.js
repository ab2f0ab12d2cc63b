// Shared by every page: DOM helpers (text only, never innerHTML: class names from folder names never become markup),
// the prototype lightbox (the whole training image with the patch boxed), downloads, the colour bar, and the
// "evaluation in progress" poller.
(function () {
  "use strict";
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(x, digits) { return (x === null || x === undefined) ? "" : Number(x).toFixed(digits); }
  function signed(x, digits) { return (x >= 0 ? "+" : "") + fmt(x, digits); }
  function sig(x, digits) {  // significant digits, never "+0" for a small real weight
    if (x === 0) return "0";
    var s = Number(x).toPrecision(digits || 3);
    return String(Number(s));
  }
  function swatch(colour) {
    var s = svg("svg", {"class": "swatch", viewBox: "0 0 1 1", "aria-hidden": "true"});
    s.appendChild(svg("rect", {width: 1, height: 1, fill: colour || "#000"}));
    return s;
  }
  function chip(f) {  // a feature as every page shows it: its colour in this view and its label ("f12 red circle")
    var a = el("a", {"class": "chip", href: "/feature/" + Number(f.feature), "data-feature": String(f.feature)});
    if (f.colour) a.appendChild(swatch(f.colour));
    a.appendChild(document.createTextNode(f.label || ("f" + f.feature)));
    return a;
  }
  function boxOverlay(box, w, h, colour) {
    var s = svg("svg", {viewBox: "0 0 " + w + " " + h, preserveAspectRatio: "none", "aria-hidden": "true"});
    var attrs = {x: box[0], y: box[1], width: box[2] - box[0], height: box[3] - box[1], "vector-effect": "non-scaling-stroke"};
    s.appendChild(svg("rect", Object.assign({"class": "pbox-under"}, attrs)));
    s.appendChild(svg("rect", Object.assign({"class": "pbox", stroke: colour || "#ffffff"}, attrs)));
    return s;
  }
  function proto(p, colour, label) {  // the same markup as the server's _macros.proto
    var fig = el("figure", {"class": "proto", "data-url": p.url,
      "data-caption": label + ", prototype " + (p.rank + 1) + ": a training image of " + p["class"] + ", peak " + sig(p.peak, 3)});
    if (p.source) { fig.setAttribute("data-source", p.source.url); fig.setAttribute("data-source-box", p.source.box.join(",")); }
    if (p.box && p.size) fig.setAttribute("data-box", [p.box[0] / p.size[0], p.box[1] / p.size[1], p.box[2] / p.size[0], p.box[3] / p.size[1]].join(","));
    var btn = el("button", {type: "button", "class": "proto-open", title: p["class"] + " · peak " + sig(p.peak, 3)});
    var boxed = el("span", {"class": "boxed"});
    boxed.appendChild(el("img", {src: p.url, alt: "prototype " + (p.rank + 1) + " of " + label}));
    if (p.box && p.size) boxed.appendChild(boxOverlay(p.box, p.size[0], p.size[1], colour));
    btn.appendChild(boxed);
    fig.appendChild(btn);
    var cap = el("figcaption", null, p["class"]);
    cap.appendChild(el("br"));
    cap.appendChild(document.createTextNode("peak " + sig(p.peak, 3)));
    fig.appendChild(cap);
    return fig;
  }
  function colourbar(scale) {  // fills #colourbar from the API's heatmap_scale
    var ramp = document.getElementById("cb-ramp");
    if (!ramp || !scale) return;
    ramp.style.background = "linear-gradient(to right, " + scale.stops.join(", ") + ")";
    document.getElementById("cb-min").textContent = sig(scale.min, 3);
    document.getElementById("cb-max").textContent = sig(scale.max, 3);
    ramp.title = scale.what + " (" + scale.colormap + ")";
  }
  function colourbarEl(scale, label) {  // a small colour bar for one image's heatmaps (class page examples)
    var box = el("div", {"class": "colourbar"});
    box.appendChild(el("span", {"class": "cb-label"}, label || "feature map value"));
    box.appendChild(el("span", null, sig(scale.min, 3)));
    var ramp = el("span", {"class": "cb-ramp", title: scale.what + " (" + scale.colormap + ")"});
    ramp.style.background = "linear-gradient(to right, " + scale.stops.join(", ") + ")";
    box.appendChild(ramp);
    box.appendChild(el("span", null, sig(scale.max, 3)));
    return box;
  }
  function download(blob, name) {
    var url = URL.createObjectURL(blob);
    var a = el("a", {href: url, download: name});
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 1000);
  }
  function downloadJSON(data, name) { download(new Blob([JSON.stringify(data, null, 1)], {type: "application/json"}), name); }
  function downloadCanvas(canvas, name) { canvas.toBlob(function (b) { download(b, name); }, "image/png"); }
  function loadImage(url) {
    return new Promise(function (resolve, reject) {
      var img = new Image();
      img.onload = function () { resolve(img); };
      img.onerror = function () { reject(new Error("cannot load " + url)); };
      img.src = url;
    });
  }
  function ellipsize(ctx, text, width) {
    if (ctx.measureText(text).width <= width) return text;
    while (text.length > 1 && ctx.measureText(text + "…").width > width) text = text.slice(0, -1);
    return text + "…";
  }

  // ------------------------------------------------------------------------------------------ the lightbox
  var lightbox = document.getElementById("lightbox");
  function openLightbox(fig) {
    var img = document.getElementById("lb-img");
    var rects = document.querySelectorAll("#lb-svg rect");
    var source = fig.getAttribute("data-source");
    var box = (source ? fig.getAttribute("data-source-box") : fig.getAttribute("data-box")) || "";
    var b = box ? box.split(",").map(Number) : null;
    var colour = (fig.querySelector("rect.pbox") || {getAttribute: function () { return "#ffffff"; }}).getAttribute("stroke");
    rects.forEach(function (r) {
      if (!b) { r.setAttribute("width", 0); return; }
      r.setAttribute("x", b[0]); r.setAttribute("y", b[1]); r.setAttribute("width", b[2] - b[0]); r.setAttribute("height", b[3] - b[1]);
      if (r.classList.contains("pbox")) r.setAttribute("stroke", colour || "#ffffff");
    });
    document.getElementById("lb-caption").textContent = (fig.getAttribute("data-caption") || "") +
      (source ? " (the whole training image; the box is the patch where the feature peaks)" : " (the stored crop; the run's training images are not available here)");
    img.onerror = function () {  // the run's data went away: fall back to the crop
      if (img.src.indexOf(fig.getAttribute("data-url")) === -1) { fig.removeAttribute("data-source"); openLightbox(fig); }
    };
    img.src = source || fig.getAttribute("data-url");
    if (!lightbox.open) lightbox.showModal();
  }
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest && ev.target.closest(".proto-open");
    if (btn && lightbox) { ev.preventDefault(); openLightbox(btn.closest("figure.proto")); }
  });
  if (lightbox) lightbox.addEventListener("click", function (ev) { if (ev.target === lightbox) lightbox.close(); });

  // ------------------------------------------------------------------- evaluation pages: wait, then reload
  var pending = document.getElementById("pending");
  if (pending && (pending.getAttribute("data-state") === "running" || pending.getAttribute("data-state") === "idle")) {
    var poll = function () {
      fetch("/api/health").then(function (r) { return r.json(); }).then(function (h) {
        var ev = h.evaluation;
        var p = document.getElementById("progress"), bar = document.getElementById("progress-bar");
        if (p) p.textContent = String(ev.done);
        if (bar) bar.value = ev.done;
        if (ev.state === "done" || ev.state === "failed") window.location.reload();
        else setTimeout(poll, 700);
      }).catch(function () { setTimeout(poll, 2000); });
    };
    setTimeout(poll, 300);
  }

  window.qpm = {el: el, svg: svg, clear: clear, fmt: fmt, signed: signed, sig: sig, swatch: swatch, chip: chip,
    proto: proto, boxOverlay: boxOverlay, colourbar: colourbar, colourbarEl: colourbarEl, download: download, downloadJSON: downloadJSON,
    downloadCanvas: downloadCanvas, loadImage: loadImage, ellipsize: ellipsize};
})();
