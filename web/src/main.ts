// Entry point: styles, token capture, the app, and global keyboard shortcuts.
import "@comfyorg/litegraph/style.css";
import "./styles.css";
import { App } from "./app";
import { captureTokenFromUrl } from "./auth";

function isEditable(t: EventTarget | null): boolean {
  const el = t as HTMLElement | null;
  return !!el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
}

captureTokenFromUrl();
const app = new App();

document.addEventListener("keydown", (e) => {
  const mod = e.ctrlKey || e.metaKey;
  if (mod && e.key === "Enter") {
    e.preventDefault();
    if (e.altKey) app.queuePanel.interrupt();
    else app.queuePrompt(app.batchCount, e.shiftKey);
  } else if (mod && (e.key === "s" || e.key === "S")) {
    e.preventDefault();
    app.saveWorkflow();
  } else if (mod && (e.key === "o" || e.key === "O")) {
    e.preventDefault();
    app.openFile();
  } else if (isEditable(e.target)) {
    return;
  } else if (mod && !e.shiftKey && (e.key === "z" || e.key === "Z")) {
    e.preventDefault();
    app.undo?.undo();
  } else if (mod && ((e.shiftKey && (e.key === "z" || e.key === "Z")) || e.key === "y" || e.key === "Y")) {
    e.preventDefault();
    app.undo?.redo();
  } else if (mod && (e.key === "m" || e.key === "M")) {
    e.preventDefault();
    app.toggleMode(2);
  } else if (mod && (e.key === "g" || e.key === "G")) {
    e.preventDefault();
    app.groupSelected();
  } else if (mod && (e.key === "b" || e.key === "B")) {
    e.preventDefault();
    app.toggleMode(4);
  } else if (!mod && e.key === ".") {
    app.fitView();
  }
}, true);

app.start(document.getElementById("app")!).catch((e) => {
  console.error(e);
  document.body.append(`Editor failed to start: ${e instanceof Error ? e.message : e}`);
});
