// Confusion page: the matrix on a canvas (rows: true class, columns: predicted; colour: share of the row; click an
// off-diagonal cell for those mistakes), a sortable per-class table, and the matrix as a PNG download.
(function () {
  "use strict";
  var Q = window.qpm;
  var canvas = document.getElementById("matrix");
  if (!canvas) return;
  var info = document.getElementById("matrix-info");
  var cm = null, geo = null;

  function viridis(t) {  // the heatmaps' colormap, 9 stops (matplotlib viridis)
    var s = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129], [92, 200, 99],
      [170, 220, 50], [253, 231, 37]];
    var x = Math.max(0, Math.min(1, t)) * 8, i = Math.min(7, Math.floor(x)), f = x - i;
    var c = s[i].map(function (v, k) { return Math.round(v + (s[i + 1][k] - v) * f); });
    return "rgb(" + c.join(",") + ")";
  }

  function draw(target, forExport) {
    var n = cm.classes.length;
    var avail = forExport ? 1400 : Math.max(240, canvas.parentElement.clientWidth - 4);
    var labels = n <= 60;
    var margin = labels ? Math.min(170, Math.max(60, avail * 0.22)) : 8;
    var cell = Math.max(2, Math.min(40, Math.floor((avail - margin - 8) / n)));
    var size = margin + n * cell + 8;
    var ratio = forExport ? 1 : (window.devicePixelRatio || 1);
    target.width = Math.round(size * ratio);
    target.height = Math.round((size + (forExport ? 40 : 0)) * ratio);
    if (!forExport) { target.style.width = size + "px"; target.style.height = size + "px"; }
    var ctx = target.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, size, size + 40);
    var top = margin + (forExport ? 40 : 0);
    if (forExport) {
      ctx.fillStyle = "#1d2330";
      ctx.font = "bold 15px sans-serif";
      ctx.fillText("confusion matrix: accuracy " + (100 * cm.accuracy).toFixed(1) + " % on " + cm.images + " test images (rows: true, columns: predicted)", 8, 22);
    }
    for (var i = 0; i < n; i++) {
      var support = cm.support[i] || 1;
      for (var j = 0; j < n; j++) {
        var v = cm.matrix[i][j];
        ctx.fillStyle = v === 0 ? "#f4f5f8" : viridis(v / support);
        ctx.fillRect(margin + j * cell, top + i * cell, cell - (cell > 4 ? 1 : 0), cell - (cell > 4 ? 1 : 0));
        if (labels && cell >= 22 && v > 0) {
          ctx.fillStyle = v / support > 0.6 ? "#1d2330" : "#ffffff";
          ctx.font = Math.min(12, cell * 0.45) + "px sans-serif";
          ctx.textAlign = "center";
          ctx.fillText(String(v), margin + j * cell + cell / 2, top + i * cell + cell / 2 + 4);
          ctx.textAlign = "left";
        }
      }
    }
    if (labels) {
      ctx.fillStyle = "#1d2330";
      ctx.font = Math.min(12, Math.max(8, cell * 0.6)) + "px sans-serif";
      for (var r = 0; r < n; r++) {
        ctx.textAlign = "right";
        ctx.fillText(Q.ellipsize(ctx, cm.classes[r], margin - 6), margin - 4, top + r * cell + cell / 2 + 4);
        ctx.save();
        ctx.translate(margin + r * cell + cell / 2 + 4, top - 4);
        ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left";
        ctx.fillText(Q.ellipsize(ctx, cm.classes[r], margin - 8), 0, 0);
        ctx.restore();
      }
      ctx.textAlign = "left";
    }
    return {margin: margin, top: top, cell: cell, n: n};
  }

  function cellAt(ev) {
    var rect = canvas.getBoundingClientRect();
    var x = ev.clientX - rect.left - geo.margin, y = ev.clientY - rect.top - geo.top;
    var i = Math.floor(y / geo.cell), j = Math.floor(x / geo.cell);
    return (i >= 0 && j >= 0 && i < geo.n && j < geo.n && x >= 0 && y >= 0) ? [i, j] : null;
  }

  fetch("/api/confusion").then(function (r) { return r.json(); }).then(function (data) {
    if (!data.matrix) return;
    cm = data;
    geo = draw(canvas, false);
    window.addEventListener("resize", function () { geo = draw(canvas, false); });
    canvas.addEventListener("mousemove", function (ev) {
      var c = cellAt(ev);
      if (!c) { info.textContent = ""; return; }
      var v = cm.matrix[c[0]][c[1]];
      info.textContent = "true " + cm.classes[c[0]] + ", predicted " + cm.classes[c[1]] + ": " + v + " of " + cm.support[c[0]] +
        " (" + (100 * v / Math.max(1, cm.support[c[0]])).toFixed(1) + " %)";
    });
    canvas.addEventListener("click", function (ev) {
      var c = cellAt(ev);
      if (c && c[0] !== c[1] && cm.matrix[c[0]][c[1]] > 0) window.location.href = "/misclassified?true=" + c[0] + "&pred=" + c[1];
    });
    document.getElementById("figure-download").addEventListener("click", function () {
      var out = Q.el("canvas");
      draw(out, true);
      Q.downloadCanvas(out, "confusion.png");
    });
  });

  // click a column head of the per-class table to sort by it
  var table = document.getElementById("per-class");
  if (table) Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    th.classList.add("sortable");
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
      th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
      function key(r) { var c = r.cells[col]; var s = c.getAttribute("data-sort"); return s !== null ? Number(s) : (isNaN(Number(c.textContent)) ? c.textContent.toLowerCase() : Number(c.textContent)); }
      rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * dir; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
