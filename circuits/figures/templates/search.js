/* circuits neuron pages: find a neuron by name ("mixed3b:60", "3b:60", "60") or by the class
   most of its top dataset examples belong to; Enter opens the first match, the arrow keys
   (outside the box) go to the previous/next page. Inlined into every page; no network. */
(function () {
  var box = document.getElementById("search"), list = document.getElementById("results");
  if (!box || !list) return;
  var prefix = box.parentNode.getAttribute("data-prefix") || "";
  var all = [];
  CIRCUITS_NEURONS.forEach(function (e) {
    e[2].forEach(function (c) {
      all.push({layer: e[0], slug: e[1], c: c, name: e[0] + ":" + c, hint: e[3][String(c)] || ""});
    });
  });
  // rank: the exact name, names that start with the query, layer-part + channel ("3b:60"),
  // then names or classes that contain it; shorter layer names first within a rank
  function find(q) {
    q = q.trim().toLowerCase();
    if (!q) return [];
    var m = q.match(/^(.*?)[:\s]\s*(\d+)$/), hits = [];
    all.forEach(function (n) {
      var name = n.name.toLowerCase(), rank = -1;
      if (name === q) rank = 0;
      else if (name.indexOf(q) === 0) rank = 1;
      else if (m && n.c === +m[2] && n.layer.toLowerCase().indexOf(m[1]) >= 0) rank = 2;
      else if (name.indexOf(q) >= 0 || (n.hint && n.hint.toLowerCase().indexOf(q) >= 0)) rank = 3;
      if (rank >= 0) hits.push([rank, n.layer.length, hits.length, n]);
    });
    hits.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1] || a[2] - b[2]; });
    return hits.slice(0, 40).map(function (h) { return h[3]; });
  }
  function show() {
    var found = find(box.value);
    list.innerHTML = "";
    found.forEach(function (n) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = prefix + "layers/" + n.slug + "/" + n.c + ".html";
      a.textContent = n.name + (n.hint ? " · " + n.hint : "");
      li.appendChild(a);
      list.appendChild(li);
    });
    list.style.display = found.length ? "block" : "none";
  }
  box.addEventListener("input", show);
  box.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter") {
      var first = list.querySelector("a");
      if (first) window.location.href = first.href;
    } else if (ev.key === "Escape") {
      box.value = ""; show();
    }
  });
  document.addEventListener("keydown", function (ev) {
    if (ev.target === box || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    var rel = ev.key === "ArrowLeft" ? "prev" : ev.key === "ArrowRight" ? "next" : null;
    var link = rel && document.querySelector('nav.pn a[rel="' + rel + '"]');
    if (link) window.location.href = link.href;
  });
})();
