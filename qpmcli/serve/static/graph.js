// The feature-sharing graph: classes laid out by networkx (spring layout on shared features), lines between classes
// that share features; hover a class for its neighbours and the features it shares, click to open it.
(function () {
  "use strict";
  var Q = window.qpm;
  var canvas = document.getElementById("graph");
  var info = document.getElementById("graph-info");
  if (!canvas) return;
  var g = null, geo = null, hover = null;

  function layout(target, w, h) {  // room on the right for the labels
    var pad = 24, label = g.nodes.length > 60 ? 12 : Math.min(190, w * 0.25);
    return g.nodes.map(function (n) { return [pad + n.x * (w - 2 * pad - label), pad + 8 + n.y * (h - 2 * pad - 8)]; });
  }

  function draw(target, w, h, ratio, focus) {
    target.width = Math.round(w * ratio);
    target.height = Math.round(h * ratio);
    var ctx = target.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, w, h);
    var pos = layout(target, w, h);
    var maxS = Math.max.apply(null, g.edges.map(function (e) { return e.shared; }).concat([1]));
    g.edges.forEach(function (e) {
      var on = focus !== null && (e.a === focus || e.b === focus);
      ctx.strokeStyle = on ? "rgba(136,34,85,0.85)" : (focus === null ? "rgba(51,34,136,0.22)" : "rgba(51,34,136,0.06)");
      ctx.lineWidth = 0.6 + 2.4 * e.shared / maxS;
      ctx.beginPath();
      ctx.moveTo(pos[e.a][0], pos[e.a][1]);
      ctx.lineTo(pos[e.b][0], pos[e.b][1]);
      ctx.stroke();
    });
    var small = g.nodes.length > 60;
    g.nodes.forEach(function (n, i) {
      ctx.fillStyle = i === focus ? "#882255" : "#332288";
      ctx.beginPath();
      ctx.arc(pos[i][0], pos[i][1], small ? 3 : 5, 0, 2 * Math.PI);
      ctx.fill();
      if (!small || i === focus) {
        ctx.fillStyle = "#1d2330";
        ctx.font = (i === focus ? "bold " : "") + "12px sans-serif";
        ctx.fillText(Q.ellipsize(ctx, n["class"], 180), pos[i][0] + 7, pos[i][1] - 6);
      }
    });
    return pos;
  }

  function size() {
    var w = Math.max(260, canvas.parentElement.clientWidth - 2);
    return [w, Math.round(Math.min(Math.max(w * 0.62, 280), 1100))];
  }
  function redraw() {
    var s = size();
    canvas.style.width = s[0] + "px";
    canvas.style.height = s[1] + "px";
    geo = draw(canvas, s[0], s[1], window.devicePixelRatio || 1, hover);
  }
  function nearest(ev) {
    var rect = canvas.getBoundingClientRect(), x = ev.clientX - rect.left, y = ev.clientY - rect.top, best = null, bd = 14 * 14;
    geo.forEach(function (p, i) { var d = (p[0] - x) * (p[0] - x) + (p[1] - y) * (p[1] - y); if (d < bd) { bd = d; best = i; } });
    return best;
  }

  fetch("/api/graph").then(function (r) { return r.json(); }).then(function (data) {
    g = data;
    redraw();
    window.addEventListener("resize", redraw);
    canvas.addEventListener("mousemove", function (ev) {
      var i = nearest(ev);
      if (i === hover) return;
      hover = i;
      redraw();
      if (i === null) { info.textContent = ""; return; }
      var links = g.edges.filter(function (e) { return e.a === i || e.b === i; });
      info.textContent = g.nodes[i]["class"] + ": shares features with " + links.length + " classes" +
        (links.length ? " (most: " + links.slice(0, 3).map(function (e) { return g.nodes[e.a === i ? e.b : e.a]["class"] + " ×" + e.shared; }).join(", ") + ")" : "");
    });
    canvas.addEventListener("click", function (ev) { var i = nearest(ev); if (i !== null) window.location.href = "/class/" + i; });
    var button = document.getElementById("figure-download");
    if (button) button.addEventListener("click", function () {
      var out = Q.el("canvas");
      draw(out, 1600, 1000, 1, null);
      Q.downloadCanvas(out, button.getAttribute("data-name"));
    });
  });
})();
