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

// An enlarged image: Escape closes it, the arrow keys step to the model's previous or next image.
// The lightbox itself is pure CSS (:target); pointing the hash at an id that does not exist closes
// it without scrolling the page. location.replace changes the hash without a history entry, so
// Back leaves the page rather than reopening images.
document.addEventListener("keydown", (event) => {
  const open = location.hash.match(/^#zoom-(\d+)-(.+)$/);
  if (!open || event.altKey || event.ctrlKey || event.metaKey) return;
  if (event.key === "Escape") {
    // "#closed" matches no element, so nothing is :target any more; then the hash is dropped from
    // the address (replaceState leaves :target as it is), so a copied URL does not end in "#closed".
    location.replace("#closed");
    history.replaceState(history.state, "", location.pathname + location.search);
  } else if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
    const next = `zoom-${Number(open[1]) + (event.key === "ArrowRight" ? 1 : -1)}-${open[2]}`;
    if (document.getElementById(decodeURIComponent(next))) {
      event.preventDefault();
      location.replace(`#${next}`);
    }
  }
});

// A scatter plot is one stop in the tab order; there the arrow keys move between its points
// (left/right in the order of x, up/down in the order of y) and Enter opens the point's concept.
// The focused point's description shows under the plot: an SVG <title> shows only on hover.
const SCATTER_STEPS = { ArrowLeft: ["cx", -1], ArrowRight: ["cx", 1], ArrowUp: ["cy", -1], ArrowDown: ["cy", 1] };
document.addEventListener("keydown", (event) => {
  const point = event.target.closest && event.target.closest("svg.chart-scatter a");
  const step = SCATTER_STEPS[event.key];
  if (!point || !step || event.altKey || event.ctrlKey || event.metaKey) return;
  event.preventDefault();  // no page scroll, and no previous/next concept
  const [axis, direction] = step;
  const other = axis === "cx" ? "cy" : "cx";
  // SVG y grows downwards: up is towards smaller cy.
  const points = [...point.ownerSVGElement.querySelectorAll("a")].map((a) => {
    const circle = a.querySelector("circle");
    return { a, main: Number(circle.getAttribute(axis)), across: Number(circle.getAttribute(other)) };
  }).sort((p, q) => p.main - q.main || q.across - p.across);
  const next = points[points.findIndex((p) => p.a === point) + direction];
  if (next) next.a.focus();
});
document.addEventListener("focusin", (event) => {
  const point = event.target.closest && event.target.closest("svg.chart-scatter a");
  if (!point) return;
  const svg = point.ownerSVGElement;
  // However the point got focus (arrow keys, a click, a screen reader), it is the plot's one tab stop.
  const stop = svg.querySelector("a[tabindex='0']");
  if (stop !== point) {
    if (stop) stop.setAttribute("tabindex", "-1");
    point.setAttribute("tabindex", "0");
  }
  let caption = svg.nextElementSibling;
  if (!caption || !caption.classList.contains("point-focus")) {
    caption = document.createElement("p");
    caption.className = "point-focus";
    caption.setAttribute("aria-hidden", "true");  // the link's own label is what a screen reader says
    svg.after(caption);
  }
  caption.textContent = point.getAttribute("aria-label");
  point.addEventListener("focusout", () => { caption.textContent = ""; }, { once: true });
});

// The arrow keys step through concepts (a concept page's previous/next) and through the
// browser's pages: they follow the page's rel=prev / rel=next link. Not while typing in a field,
// with a modifier held (browser shortcuts), or with an enlarged image open.
document.addEventListener("keydown", (event) => {
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  if (event.target.closest && event.target.closest("input, textarea, select, button, summary, form, [contenteditable]")) return;
  if (location.hash.startsWith("#zoom-")) return;
  // Never leave a label being written: its fields differ from what the page was served with.
  const draft = document.getElementById("label-form");
  if (draft && [...draft.elements].some((f) => "defaultValue" in f && f.type !== "hidden" && f.value !== f.defaultValue)) return;
  const link = document.querySelector(event.key === "ArrowLeft" ? "a[rel=prev]" : "a[rel=next]");
  if (link) { event.preventDefault(); link.click(); }
});

// However a lightbox closes (Escape, Close, the backdrop), keyboard focus goes back to the
// thumbnail of the image it showed last, not to the top of the page.
window.addEventListener("hashchange", (event) => {
  const closed = new URL(event.oldURL).hash;
  if (!closed.startsWith("#zoom-") || location.hash.startsWith("#zoom-")) return;
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

// A date field shows the day in the browser's own format (01/04/2027 is 4 January in one country
// and 1 April in the next): the line under it names the day in words, as the list of links does.
const WEEKDAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
document.addEventListener("input", (event) => {
  const words = event.target.id && document.querySelector(`[data-day-in-words="${CSS.escape(event.target.id)}"]`);
  if (!words) return;
  const value = event.target.value || words.dataset.defaultDay || "";  // left empty, the server picks the default
  const day = /^\d{4}-\d{2}-\d{2}$/.test(value) ? new Date(`${value}T00:00:00Z`) : null;
  words.textContent = day && !isNaN(day) ? `Works through ${WEEKDAYS[day.getUTCDay()]} ${String(day.getUTCDate()).padStart(2, "0")} `
    + `${MONTHS[day.getUTCMonth()]} ${day.getUTCFullYear()}, 23:59 UTC.` : "";
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

// The browser's filters send only the fields in use: a view's address stays short enough to read
// and to share (`?sort=entropy`, not `?q=&sort=entropy&min_entropy=&...`). The server reads an
// empty field as unset anyway, so without this file the same view comes up.
document.addEventListener("submit", (event) => {
  if (event.target.id !== "filters" || event.defaultPrevented) return;
  const empty = [...event.target.querySelectorAll("input[name], select[name]")].filter((f) => f.value === "");
  empty.forEach((f) => { f.disabled = true; });
  // The form's data is taken as the submit event ends: switch the fields back on right after,
  // so a stopped load or a page restored from history never keeps them switched off.
  setTimeout(() => empty.forEach((f) => { f.disabled = false; }), 0);
});

// The browser's Order: its empty choice is the sort's usual direction (statistics highest first,
// concept numbers lowest first), so an untouched Order follows a new sort and a named direction
// stays, with or without this script. Here a new sort also renames the two choices to match; a
// direction named once stays named (`data-named`) through sorts it is usual for, as the form's
// value would without the script.
document.addEventListener("change", (event) => {
  const field = event.target;
  const order = field.form && field.form.id === "filters" && field.form.elements.namedItem("order");
  if (!order) return;
  if (field === order) { order.dataset.named = order.value; return; }
  if (field.id !== "sort" || !field.selectedOptions[0]) return;
  const named = "named" in order.dataset ? order.dataset.named : order.value;
  const usual = field.selectedOptions[0].dataset.order;
  const other = usual === "desc" ? "asc" : "desc";
  order.options[0].textContent = order.dataset[usual];
  order.options[1].value = other;
  order.options[1].textContent = order.dataset[other];
  order.selectedIndex = (named || usual) === usual ? 0 : 1;
  order.dataset.named = named;
});

// Explain an image: the button says it is working (the first image of a run loads its
// backbones first), and a result's heatmap shows large in place of the uploaded image.
document.addEventListener("submit", (event) => {
  const button = event.target.id === "explain-form" && document.getElementById("explain-submit");
  if (!button) return;
  button.disabled = true;
  button.textContent = "Explaining…";
});
window.addEventListener("pageshow", () => {  // back to a page the browser kept: usable again
  const button = document.getElementById("explain-submit");
  if (button) { button.disabled = false; button.textContent = "Explain"; }
});
function showExplained(heat) {
  const view = document.getElementById("explain-view");
  const caption = document.getElementById("explain-view-caption");
  if (!view || !caption) return;
  if (!view.dataset.original) view.dataset.original = view.src;
  document.querySelectorAll(".explain-heat.shown").forEach((h) => h.classList.remove("shown"));
  if (heat) {
    view.src = heat.src;
    heat.classList.add("shown");
    caption.querySelector("span").textContent = heat.dataset.caption;
    caption.hidden = false;
    // On a phone the large view is a screen or more above the results: bring it into sight.
    const box = view.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) view.scrollIntoView({ block: "start", behavior: "smooth" });
  } else {
    view.src = view.dataset.original;
    caption.hidden = true;
  }
}
document.addEventListener("click", (event) => {
  if (event.target.closest("#explain-view-reset")) { showExplained(null); return; }
  const heat = event.target.closest(".explain-heat");
  if (heat) showExplained(heat);
});
document.addEventListener("keydown", (event) => {
  const heat = event.target.closest && event.target.closest(".explain-heat");
  if (heat && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); showExplained(heat); }
});

// On a phone the concept browser's filters fold behind "More filters" (the search stays), so the
// cards start on the first screen; the button counts the folded filters in use.
(() => {
  const filters = document.getElementById("filters");
  if (!filters || !window.matchMedia("(max-width: 800px)").matches) return;
  const actions = filters.querySelector(".actions");
  if (!actions) return;
  const folded = [...filters.querySelectorAll(".field:not(:first-child) select, .field:not(:first-child) input")];
  const inUse = folded.filter((f) => f.name !== "sort" && f.name !== "order" && f.value !== "").length;
  const more = document.createElement("button");
  more.type = "button";
  more.id = "more-filters";
  more.textContent = inUse ? `More filters (${inUse} in use)` : "More filters";
  more.addEventListener("click", () => {
    filters.classList.remove("folded");
    more.remove();
    const first = filters.querySelector(".field:nth-child(2) select, .field:nth-child(2) input");
    if (first) first.focus();  // the button is gone: keep keyboard focus in the filters
  });
  actions.append(more);
  filters.classList.add("folded");
})();

// On a phone the reading guide, open for link holders, would push the images some 1,300 px down
// on every page: there it starts folded, its summary at the top one tap away (open without JS).
if (window.matchMedia("(max-width: 640px)").matches) {
  document.querySelectorAll("details.reading-guide[open]").forEach((guide) => { guide.open = false; });
}
