// ferry gateway console: draws the charts from <script type="application/json"> blocks (the pages
// carry no inline script: the Content-Security-Policy allows none) and asks before a form with
// data-confirm is sent.
(function () {
  "use strict";
  var COLORS = ["#1f5f99", "#d9822b", "#b3261e", "#1e7d3a", "#7b4ea3", "#5d6b78", "#c2a100", "#2a9d8f"];

  function bars(label, data, color, stack) {
    return { type: "bar", label: label, data: data, backgroundColor: color, stack: stack };
  }

  var CHARTS = {
    routing: function (d) {
      return {
        data: {
          labels: d.labels,
          datasets: [
            bars("on-prem", d.onprem, COLORS[0], "r"),
            bars("cloud", d.cloud, COLORS[1], "r"),
            bars("refused", d.refused, COLORS[2], "r"),
            { type: "line", label: "overflow share (%)", data: d.share, yAxisID: "share", borderColor: COLORS[4],
              backgroundColor: COLORS[4], spanGaps: true, pointRadius: 2 }
          ]
        },
        options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "requests" } },
                             share: { position: "right", min: 0, max: 100, grid: { drawOnChartArea: false },
                                      title: { display: true, text: "overflow %" } } } }
      };
    },
    classes: function (d) {
      var names = Object.keys(d.data_classes).sort();
      return {
        data: { labels: d.labels,
                datasets: names.map(function (n, i) { return bars(n, d.data_classes[n], COLORS[i % COLORS.length], "c"); }) },
        options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } }
      };
    },
    spend: function (d) {
      return {
        data: { labels: d.labels, datasets: [bars("spend (USD)", d.values, COLORS[0])] },
        options: { indexAxis: "y", plugins: { legend: { display: false } } }
      };
    }
  };

  function draw(root) {
    if (typeof Chart === "undefined") { return; }
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (Chart.getChart(canvas)) { return; }
      var source = document.getElementById(canvas.dataset.source);
      var make = CHARTS[canvas.dataset.chart];
      if (!source || !make) { return; }
      var config = make(JSON.parse(source.textContent));
      config.type = "bar";
      config.options.animation = false;
      config.options.maintainAspectRatio = false;
      new Chart(canvas, config);
    });
  }

  document.addEventListener("DOMContentLoaded", function () { draw(document); });
  document.addEventListener("htmx:load", function (e) { draw(e.target); });
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) { e.preventDefault(); }
  });
})();
