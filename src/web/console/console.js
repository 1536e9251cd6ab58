// The crier console's script: the live preview while the comms lead types, and the live
// progress after Send. Plain JavaScript, no build step. Every page works without it: the
// Preview button and a refreshing progress page do the same by hand.
(function () {
  "use strict";

  // Replaces the previews with the server's rendering of the form as it is now. Each channel
  // is rendered by crier itself, through the same code that sends it.
  function livePreview(form) {
    var previews = document.getElementById("previews");
    // Not form.action: the buttons named "action" shadow that property.
    var target = form.getAttribute("action");
    var timer = null;
    var latest = 0;
    function refresh() {
      var mine = ++latest;
      var data = new FormData(form);
      data.set("action", "preview");
      fetch(target, {
        method: "POST",
        body: data,
        credentials: "same-origin",
        headers: { "X-Crier-Fragment": "previews" }
      }).then(function (answer) {
        if (answer.status === 401) {
          throw new Error("your session has ended: sign in again in another tab, your text stays here");
        }
        if (!answer.ok) { throw new Error("the preview answered " + answer.status); }
        return answer.text();
      }).then(function (html) {
        // An older answer arriving late must not replace a newer one.
        if (mine === latest) { previews.innerHTML = html; }
      }).catch(function (error) {
        if (mine !== latest) { return; }
        var note = document.createElement("p");
        note.className = "error";
        note.textContent = "The preview could not be refreshed (" + error.message + "): press Preview.";
        previews.replaceChildren(note);
      });
    }
    function soon() {
      clearTimeout(timer);
      timer = setTimeout(refresh, 300);
    }
    form.addEventListener("input", soon);
    form.addEventListener("change", soon);
    if (document.getElementById("body").value.trim() !== "") { refresh(); }
  }

  // Refreshes the delivery counts until every delivery is final.
  function liveProgress(section) {
    var url = "/admin/updates/" + encodeURIComponent(section.dataset.update) + "/progress";
    function isFinal() {
      var state = document.getElementById("progress-state");
      return state && state.dataset.final === "true";
    }
    function poll() {
      if (isFinal()) { return; }
      fetch(url, { credentials: "same-origin", headers: { "X-Crier-Fragment": "progress" } }).then(function (answer) {
        if (answer.status === 401) { signedOut(); return null; }
        if (!answer.ok) { throw new Error(String(answer.status)); }
        return answer.text();
      }).then(function (html) {
        if (html === null) { return; }
        section.innerHTML = html;
        setTimeout(poll, 1000);
      }).catch(function () {
        // The server may be restarting: try again a little later.
        setTimeout(poll, 3000);
      });
    }
    function signedOut() {
      var state = document.getElementById("progress-state");
      if (state) {
        state.textContent = "Your session has ended: sign in again to follow the progress. ";
        var link = document.createElement("a");
        link.href = "/admin/login";
        link.textContent = "Sign in";
        state.appendChild(link);
      }
    }
    setTimeout(poll, 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("compose");
    if (form && window.fetch && window.FormData) { livePreview(form); }
    var progress = document.getElementById("progress");
    if (progress && window.fetch) { liveProgress(progress); }
  });
})();
