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
