// Model overview: class search and the class x feature grid (rows open classes, column headers open features).
(function () {
  "use strict";
  var grid = document.getElementById("grid");
  var search = document.getElementById("class-search");
  var count = document.getElementById("search-count");
  if (!grid) return;
  var rows = Array.prototype.slice.call(grid.tBodies[0].rows);
  if (grid.classList.contains("dense")) {  // a dense head: each cell coloured by its weight (diverging, one scale)
    var cells = grid.querySelectorAll("td[data-w]");
    var max = 1e-12;
    Array.prototype.forEach.call(cells, function (c) { max = Math.max(max, Math.abs(Number(c.getAttribute("data-w")))); });
    Array.prototype.forEach.call(cells, function (c) {
      var w = Number(c.getAttribute("data-w")) / max, a = Math.min(1, Math.abs(w));
      c.style.background = w >= 0 ? "rgba(178,24,43," + a.toFixed(3) + ")" : "rgba(33,102,172," + a.toFixed(3) + ")";
      c.title = "weight " + c.getAttribute("data-w");
    });
  }
  var heads = grid.tHead.rows[0].cells;

  function highlight(col, on) {
    if (col === null) return;
    var head = heads[col + 1];
    if (head) head.classList.toggle("hl", on);
    rows.forEach(function (row) {
      var cell = row.cells[col + 1];
      if (cell) cell.classList.toggle("hl", on);
    });
  }

  var current = null;
  grid.addEventListener("mouseover", function (ev) {
    var cell = ev.target.closest("td, th.col");
    var col = cell && cell.hasAttribute("data-col") ? Number(cell.getAttribute("data-col")) : null;
    if (col === current) return;
    highlight(current, false);
    current = col;
    highlight(current, true);
  });
  grid.addEventListener("mouseleave", function () { highlight(current, false); current = null; });
  grid.addEventListener("click", function (ev) {
    if (ev.target.closest("a")) return;  // links navigate by themselves
    var cell = ev.target.closest("td");
    if (!cell) return;
    var row = cell.parentElement;
    var href = row.getAttribute("data-href");
    if (href) window.location.href = href;
  });

  function filter() {
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    rows.forEach(function (row) {
      var hit = !q || (row.getAttribute("data-name") || "").toLowerCase().indexOf(q) !== -1;
      row.classList.toggle("hidden", !hit);
      if (hit) shown += 1;
    });
    count.textContent = q ? shown + " of " + rows.length + " classes" : "";
    return shown;
  }
  if (search) {
    search.addEventListener("input", filter);
    search.addEventListener("keydown", function (ev) {
      if (ev.key !== "Enter") return;
      ev.preventDefault();
      var visible = rows.filter(function (row) { return !row.classList.contains("hidden"); });
      if (visible.length === 1) window.location.href = visible[0].getAttribute("data-href");
    });
  }
})();
