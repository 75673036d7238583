// Progressive enhancements only: every page works without this file.
document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const input = document.getElementById(button.dataset.copy);
  if (!input) return;
  input.select();
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(input.value).then(done, () => {});
  } else {
    document.execCommand("copy");
    done();
  }
});

// Close an enlarged image with Escape. The lightbox itself is pure CSS (:target); pointing the
// hash at an id that does not exist closes it without scrolling the page.
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && location.hash.startsWith("#zoom-")) {
    location.hash = "closed";
  }
});

// However a lightbox closes (Escape, Close, the backdrop), keyboard focus goes back to the
// thumbnail that opened it, not to the top of the page.
window.addEventListener("hashchange", (event) => {
  const closed = new URL(event.oldURL).hash;
  if (!closed.startsWith("#zoom-") || location.hash === closed) return;
  const opener = document.querySelector(`.top-images a[href="${CSS.escape(closed)}"]`);
  if (opener) opener.focus({ preventScroll: true });
});

// A field that only makes sense with one choice picks that choice when typed into (the audit-link
// form: concept numbers mean "only these concepts"). The server refuses the contradiction anyway.
document.addEventListener("input", (event) => {
  const id = event.target.dataset && event.target.dataset.checks;
  const choice = id && document.getElementById(id);
  if (choice && event.target.value.trim()) choice.checked = true;
});

// A file over the upload limit is refused before it is sent (the server answers a far larger
// body with a bare 413, and anything over the limit with the same words as here).
document.addEventListener("change", (event) => {
  const input = event.target;
  if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.dataset.maxBytes) return;
  const limit = Number(input.dataset.maxBytes);
  const file = input.files && input.files[0];
  const mb = (bytes) => (bytes / 1e6).toFixed(1);
  input.setCustomValidity(file && file.size > limit ? `This file has ${mb(file.size)} MB; the limit is ${mb(limit)} MB.` : "");
  input.reportValidity();
});
