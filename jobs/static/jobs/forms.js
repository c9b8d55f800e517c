// A form that changes something is sent once: a double click on "Run now"
// or "Rerun" sent two POSTs, so a job ran twice (or a second, skipped run
// was recorded, and its page is the one that opened).
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.method !== "post") return;
    if (form.dataset.sent) {
      event.preventDefault();
      return;
    }
    form.dataset.sent = "1";
    form.querySelectorAll("button:not(:disabled)").forEach(function (button) {
      button.disabled = true;
      button.dataset.disabledWhileSent = "1";
    });
  });
  // Back on a page the browser kept as it was: its forms can be sent again.
  window.addEventListener("pageshow", function (event) {
    if (!event.persisted) return;
    document.querySelectorAll("form[data-sent]").forEach(function (form) {
      delete form.dataset.sent;
      form.querySelectorAll("button[data-disabled-while-sent]").forEach(function (button) {
        button.disabled = false;
        delete button.dataset.disabledWhileSent;
      });
    });
  });
})();
