// Live tail of a running run's log: poll the fragment endpoint every second,
// append what is new, update duration and progress bar, reload the page once
// the run's status changes (a queued run starts: its start time, worker; a
// run finishes: its outcome, exit code and files) and once the run has
// recorded what it got (its command and environment, a moment after it starts),
// and once someone asks for it to be cancelled (it says "stopping…").
(function () {
  "use strict";
  var log = document.getElementById("run-log");
  if (!log || !log.dataset.tailUrl) return;
  var shownStatus = document.querySelector("#run-status .badge").dataset.status;
  var notice = document.getElementById("tail-notice");
  var failures = 0;

  // Why the tail is behind or has stopped, under the log where its reader looks.
  function say(text, link) {
    if (!notice) return;
    notice.replaceChildren(document.createTextNode(text));
    if (link) {
      var a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      notice.append(" ", a);
    }
    notice.hidden = !text;
  }

  // An answer that retrying will not change: say why and poll no more.
  function Stop(text, link) {
    this.text = text;
    this.link = link;
  }

  // The fragment carries the progress block as the page renders it: swap it in.
  function updateProgress(fresh) {
    var current = document.getElementById("run-progress");
    if (!fresh || !current) return;
    current.replaceWith(document.importNode(fresh, true));
    var none = document.getElementById("no-progress");
    if (none && !fresh.hidden) none.remove();
  }

  function show(tail) {
    var text = tail.querySelector(".tail-text").textContent;
    if (text) {
      var atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 20;
      log.appendChild(document.createTextNode(text));
      if (atBottom) window.scrollTo(0, document.body.scrollHeight);
    }
    log.dataset.lastSeq = tail.dataset.lastSeq;
    log.dataset.tailEnd = tail.dataset.tailEnd;
    document.getElementById("run-status").replaceChildren(
      document.importNode(tail.querySelector(".tail-status .badge"), true));
    document.getElementById("run-duration").textContent =
      tail.querySelector(".tail-duration").textContent || "—";
    updateProgress(tail.querySelector("#run-progress"));
  }

  function poll() {
    var url = log.dataset.tailUrl + "?after=" + encodeURIComponent(log.dataset.lastSeq) +
      "&tail_end=" + encodeURIComponent(log.dataset.tailEnd || "0");
    fetch(url, { credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 404) {
          throw new Stop("Live updates stopped: this run no longer exists.");
        }
        if (response.status >= 400 && response.status < 500) {
          throw new Stop("Live updates stopped: the server refused (" + response.status + ").",
            { href: window.location.href, text: "Reload" });
        }
        if (!response.ok) throw new Error("the server answered " + response.status);
        return response.text().then(function (html) {
          var tail = new DOMParser().parseFromString(html, "text/html").getElementById("tail");
          // Anything else is the login page the request was sent to: the session ended.
          if (!tail) {
            throw new Stop("Live updates stopped: your session has ended.",
              { href: window.location.href, text: "Log in again" });
          }
          return tail;
        });
      })
      .then(function (tail) {
        failures = 0;
        say("");
        show(tail);
        var status = tail.querySelector(".tail-status .badge").dataset.status;
        if (status !== shownStatus || tail.dataset.final === "1" ||
            tail.dataset.recorded !== log.dataset.recorded ||
            tail.dataset.cancelling !== log.dataset.cancelling) window.location.reload();
        else setTimeout(poll, 1000);
      })
      .catch(function (error) {
        if (error instanceof Stop) {
          say(error.text, error.link);
          return;
        }
        failures += 1;
        say("Live updates interrupted (" + (error.message || "no answer") + "); trying again…");
        setTimeout(poll, Math.min(3000 * failures, 30000));
      });
  }
  setTimeout(poll, 1000);
})();
