// The page's entry point: hash routes (#/search, #/jobs, #/jobs/<id>, #/models, #/classify) shown as
// keyboard-operable tabs, and the API key dialog the API client opens on a 401.

import { apiKey, onKeyNeeded, setApiKey } from "./api.js";
import * as classify from "./classify.js";
import * as jobs from "./jobs.js";
import * as models from "./models.js";
import * as search from "./search.js";
import { announce } from "./ui.js";

const $ = (id) => document.getElementById(id);
const SECTIONS = { search, jobs, models, classify };
const tabs = () => [...document.querySelectorAll('[role="tab"]')];
let current = null;

function parseHash() {
  const [name, ...rest] = window.location.hash.replace(/^#\/?/, "").split("/");
  const section = name in SECTIONS ? name : "search";
  return { section, arg: rest.length ? decodeURIComponent(rest.join("/")) : null };
}

function route() {
  const { section, arg } = parseHash();
  if (current && current !== section) SECTIONS[current].hide();
  for (const tab of tabs()) {
    const selected = tab.dataset.route === section;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  current = section;
  SECTIONS[section].show(arg);
}

function wireTabs() {
  for (const tab of tabs()) {
    tab.addEventListener("click", () => {
      const target = `#/${tab.dataset.route}`;
      if (window.location.hash === target) route();
      else window.location.hash = target;
    });
    // Arrow keys, Home and End move between tabs (WAI-ARIA tabs pattern, automatic activation).
    tab.addEventListener("keydown", (event) => {
      const all = tabs();
      const at = all.indexOf(tab);
      const next = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: all.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      const target = all[(next + all.length) % all.length];
      target.focus();
      target.click();
    });
  }
}

/** Open the key dialog; resolves to the entered key, or null when the user cancels. */
function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason || "This server needs an API key.";
  $("key-input").value = "";
  return new Promise((resolve) => {
    const finish = (value) => {
      dialog.removeEventListener("close", onClose);
      resolve(value);
    };
    const onClose = () => finish(dialog.returnValue === "save" ? $("key-input").value.trim() || null : null);
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    $("key-input").focus();
  });
}

function wireKeyDialog() {
  const dialog = $("key-dialog");
  $("key-cancel").addEventListener("click", () => dialog.close(""));
  $("key-forget").addEventListener("click", () => {
    setApiKey(null);
    dialog.close("");
    announce("The API key was removed from this tab.");
  });
  $("key-button").addEventListener("click", async () => {
    const key = await askForKey(apiKey() ? "Replace the API key used by this tab." : "Enter the API key for this server.");
    if (key) {
      setApiKey(key);
      announce("API key saved for this tab.");
      route();
    }
  });
  onKeyNeeded(askForKey);
}

search.init();
jobs.init();
models.init();
classify.init();
wireTabs();
wireKeyDialog();
window.addEventListener("hashchange", route);
route();
