// Class page: each test image shown with the heatmap of every feature of the class (the class's colours, one scale
// per image, explained as this class), and the prototype figure as a PNG download.
(function () {
  "use strict";
  var Q = window.qpm, el = Q.el;
  var box = document.getElementById("examples");
  if (box) {
    var cls = box.getAttribute("data-class");
    Array.prototype.forEach.call(box.querySelectorAll(".example"), function (ex) {
      fetch(ex.getAttribute("data-url")).then(function (r) { return r.blob(); }).then(function (blob) {
        var body = new FormData();
        body.append("file", blob, ex.getAttribute("data-name") || "test.png");
        body.append("class", cls);
        body.append("top_k", "1");
        body.append("heatmaps", "png");
        var photo = URL.createObjectURL(blob);
        return fetch("/api/explain", {method: "POST", body: body}).then(function (r) { return r.json(); }).then(function (d) {
          Q.clear(ex);
          var head = el("p", {"class": "note"});
          head.appendChild(document.createTextNode(ex.getAttribute("data-name") + ": predicted "));
          head.appendChild(el("a", {href: "/class/" + Number(d.predicted.index)}, d.predicted["class"]));
          head.appendChild(document.createTextNode(" · p(this class) " + (100 * d.explained.probability).toFixed(0) + " %"));
          ex.appendChild(head);
          var tiles = el("div", {"class": "tiles"});
          d.explained.features.forEach(function (f) {
            var t = el("figure", {"class": "tile"});
            var stack = el("div", {"class": "stack"});
            stack.style.borderColor = f.colour;
            stack.appendChild(el("img", {"class": "photo", src: photo, alt: "test image"}));
            stack.appendChild(el("img", {"class": "heat", src: d.heatmaps[String(f.feature)], alt: "where " + f.label + " fires"}));
            t.appendChild(stack);
            var cap = el("figcaption");
            cap.appendChild(Q.chip(f));
            cap.appendChild(el("span", {"class": "note"}, " " + Q.signed(f.contribution, 2)));
            t.appendChild(cap);
            tiles.appendChild(t);
          });
          ex.appendChild(tiles);
          if (d.heatmap_scale) ex.appendChild(Q.colourbarEl(d.heatmap_scale, "feature map value"));
        });
      }).catch(function (err) { ex.appendChild(el("p", {"class": "error"}, "could not explain: " + err)); });
    });
  }

  var button = document.getElementById("figure-download");
  if (button) button.addEventListener("click", function () {
    var rows = Array.prototype.slice.call(document.querySelectorAll(".feature-row"));
    var n = Math.max.apply(null, rows.map(function (r) { return r.querySelectorAll("figure.proto").length; }).concat([1]));
    var side = 128, pad = 12, labelW = 220, rowH = side + 36;
    var canvas = el("canvas");
    canvas.width = labelW + n * (side + pad) + pad;
    canvas.height = 50 + rows.length * rowH;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.fillStyle = "#1d2330";
    ctx.font = "bold 17px sans-serif";
    ctx.fillText(Q.ellipsize(ctx, document.getElementById("class-name").textContent + ": its features and their training prototypes", canvas.width - 2 * pad), pad, 28);
    var jobs = [];
    rows.forEach(function (row, r) {
      var y = 50 + r * rowH, colour = row.getAttribute("data-colour") || "#000";
      ctx.fillStyle = colour;
      ctx.fillRect(pad, y + 4, 16, 16);
      ctx.fillStyle = "#1d2330";
      ctx.font = "bold 14px sans-serif";
      ctx.fillText(Q.ellipsize(ctx, row.getAttribute("data-label"), labelW - 40), pad + 22, y + 17);
      Array.prototype.forEach.call(row.querySelectorAll("figure.proto"), function (fig, i) {
        var x = labelW + i * (side + pad), b = (fig.getAttribute("data-box") || "").split(",").map(Number);
        jobs.push(Q.loadImage(fig.getAttribute("data-url")).then(function (img) {
          ctx.drawImage(img, x, y, side, side);
          if (b.length === 4) {
            ctx.lineWidth = 4; ctx.strokeStyle = "#000";
            ctx.strokeRect(x + b[0] * side, y + b[1] * side, (b[2] - b[0]) * side, (b[3] - b[1]) * side);
            ctx.lineWidth = 2; ctx.strokeStyle = colour;
            ctx.strokeRect(x + b[0] * side, y + b[1] * side, (b[2] - b[0]) * side, (b[3] - b[1]) * side);
          }
          ctx.fillStyle = "#5b6475";
          ctx.font = "11px sans-serif";
          ctx.fillText(Q.ellipsize(ctx, fig.querySelector("figcaption").textContent.replace(/\s+/g, " "), side), x, y + side + 14);
        }));
      });
    });
    Promise.all(jobs).then(function () { Q.downloadCanvas(canvas, button.getAttribute("data-name")); });
  });
})();
