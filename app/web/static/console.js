// Courier console: the only script. "Select all" on the dead letters; a confirm before bulk actions.
// Served from this package ('self' in the Content-Security-Policy); no inline handlers.
document.addEventListener("DOMContentLoaded", function () {
  var all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", function () {
      document.querySelectorAll("input.pick").forEach(function (box) { box.checked = all.checked; });
    });
  }
  var bulk = document.getElementById("replay-all");
  if (bulk) {
    bulk.addEventListener("click", function (event) {
      if (!window.confirm("Replay every dead delivery matching this filter?")) { event.preventDefault(); }
    });
  }
});
