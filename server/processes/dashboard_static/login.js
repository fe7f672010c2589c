"use strict";

function showError() {
  const reason = new URLSearchParams(window.location.search).get("error");
  const box = document.getElementById("login-error");
  if (reason && TEXTS.zh[`error_${reason}`]) {
    box.textContent = t(`error_${reason}`);
    box.dataset.reason = reason;
    box.hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  installToggle(showError);
  showError();
});
