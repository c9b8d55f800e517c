// Live tail of a running run's log: poll the fragment endpoint every second,
// append what is new, update status, duration and progress bar, reload the
// page once the run has started (if it was queued) and once it has finished.
(function () {
  "use strict";
  var log = document.getElementById("run-log");
  if (!log || !log.dataset.tailUrl) return;

  // The fragment carries the progress block as the page renders it: swap it in.
  function updateProgress(fresh) {
    var current = document.getElementById("run-progress");
    if (!fresh || !current) return;
    current.replaceWith(document.importNode(fresh, true));
    var none = document.getElementById("no-progress");
    if (none && !fresh.hidden) none.remove();
  }

  function poll() {
    var url = log.dataset.tailUrl + "?after=" + encodeURIComponent(log.dataset.lastSeq);
    fetch(url, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error(response.status);
        return response.text();
      })
      .then(function (html) {
        var tail = new DOMParser().parseFromString(html, "text/html").getElementById("tail");
        var text = tail.querySelector(".tail-text").textContent;
        if (text) {
          var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 20;
          log.appendChild(document.createTextNode(text));
          if (atBottom) window.scrollTo(0, document.body.scrollHeight);
        }
        log.dataset.lastSeq = tail.dataset.lastSeq;
        document.getElementById("run-status").replaceChildren(
          document.importNode(tail.querySelector(".tail-status .badge"), true));
        document.getElementById("run-duration").textContent =
          tail.querySelector(".tail-duration").textContent || "—";
        updateProgress(tail.querySelector("#run-progress"));
        // Reload when the run ends, and when the run has recorded what it
        // got (a second after it starts): the page then shows its start
        // time, worker, command and environment.
        if (tail.dataset.final === "1" || tail.dataset.recorded !== log.dataset.recorded) {
          window.location.reload();
        }
        else setTimeout(poll, 1000);
      })
      .catch(function () { setTimeout(poll, 3000); });
  }
  setTimeout(poll, 1000);
})();
