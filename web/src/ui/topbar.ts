// The top bar: workflow menu, name, connection state, batch count and the Queue button.
import type { App } from "../app";
import { h, icon } from "./dom";
import { infoDialog, promptDialog } from "./dialog";

const SHORTCUTS: [string, string][] = [
  ["Ctrl+Enter", "Queue the graph (batch count times)"],
  ["Ctrl+Shift+Enter", "Queue at the front of the queue"],
  ["Ctrl+Alt+Enter", "Interrupt the running prompt"],
  ["Ctrl+S", "Save the workflow"],
  ["Ctrl+O", "Open a workflow (.json or .png)"],
  ["Ctrl+Z / Ctrl+Y", "Undo / redo"],
  ["Ctrl+M", "Mute / unmute the selected nodes"],
  ["Ctrl+B", "Bypass / un-bypass the selected nodes"],
  ["Ctrl+G", "Group the selected nodes"],
  ["Ctrl+C / Ctrl+V", "Copy / paste nodes"],
  ["Delete", "Delete the selected nodes"],
  ["Double-click canvas", "Search and add a node"],
  ["Drag a link to empty space", "Add a node that takes it"],
  [".", "Fit the whole graph in view"],
];

function showShortcuts(): void {
  const table = h("table", { class: "shortcuts" },
    SHORTCUTS.map(([k, d]) => h("tr", {}, h("td", {}, h("kbd", {}, k)), h("td", {}, d))));
  infoDialog("Keyboard shortcuts", table);
}

function menu(button: HTMLElement, items: [string, string, () => void][]): void {
  const list = h("div", { class: "menu" });
  for (const [label, hint, fn] of items) {
    list.append(h("button", {
      class: "menu-item",
      onclick: () => {
        close();
        fn();
      },
    }, h("span", {}, label), hint ? h("kbd", {}, hint) : null));
  }
  const r = button.getBoundingClientRect();
  Object.assign(list.style, { left: `${r.left}px`, top: `${r.bottom + 4}px` });
  const close = () => {
    list.remove();
    document.removeEventListener("pointerdown", outside, true);
  };
  const outside = (e: Event) => {
    if (!list.contains(e.target as Node)) close();
  };
  setTimeout(() => document.addEventListener("pointerdown", outside, true), 0);
  document.body.append(list);
}

export class TopBar {
  readonly el: HTMLElement;
  private nameEl: HTMLElement;
  private statusEl: HTMLElement;
  private queueCountEl: HTMLElement;
  private batch: HTMLInputElement;
  readonly queueButton: HTMLButtonElement;

  constructor(private app: App) {
    const workflowBtn: HTMLButtonElement = h("button", {
      class: "btn btn-ghost",
      "aria-haspopup": "menu",
      onclick: () => menu(workflowBtn, [
        ["New tab", "", () => app.newGraph()],
        ["Templates…", "", () => void app.templates.show()],
        ["Open…", "Ctrl+O", () => app.openFile()],
        ["Save…", "Ctrl+S", () => app.saveWorkflow()],
        ["Export workflow (.json)", "", () => app.exportWorkflow()],
        ["Export API prompt (.json)", "", () => app.exportApi()],
        ["Load default graph", "", () => void app.openDefault()],
        ["Undo", "Ctrl+Z", () => app.undo?.undo()],
        ["Redo", "Ctrl+Y", () => app.undo?.redo()],
        ["Fit view", ".", () => app.fitView()],
        ["Keyboard shortcuts", "", () => showShortcuts()],
        ["Settings…", "Ctrl+,", () => app.settingsDialog.show()],
      ]),
    }, "Workflow", icon("chevron"));
    this.nameEl = h("button", { class: "workflow-name", title: "Rename", onclick: () => this.rename() }, app.workflowName);
    this.statusEl = h("span", { class: "conn", title: "Server connection" }, h("span", { class: "dot" }), h("span", { class: "conn-text" }, "Connecting…"));
    this.queueCountEl = h("button", { class: "queue-count", title: "Show the queue", onclick: () => app.side.show("queue") }, "Queue 0");
    this.batch = h("input", { class: "input batch", type: "number", min: "1", max: "100", value: "1", title: "Batch count: how many prompts one click queues", "aria-label": "Batch count" });
    this.batch.addEventListener("change", () => {
      const n = Math.max(1, Math.min(100, Math.round(Number(this.batch.value) || 1)));
      this.batch.value = String(n);
      app.batchCount = n;
    });
    this.batch.addEventListener("keydown", (e) => e.stopPropagation());
    this.queueButton = h("button", { class: "btn btn-primary queue-btn", title: "Queue the graph (Ctrl+Enter)", onclick: () => app.queuePrompt() }, icon("play"), "Queue");
    this.el = h("header", { class: "topbar" },
      h("div", { class: "brand" }, h("span", { class: "logo" }), "sdflow"),
      workflowBtn,
      h("button", { class: "btn btn-ghost templates-btn", title: "Browse workflow templates", onclick: () => void app.templates.show() }, icon("image"), "Templates"),
      h("button", { class: "btn btn-ghost", title: "Reload node definitions and model lists from the server", onclick: () => app.refreshNodeDefs() }, icon("refresh"), "Refresh"),
      this.nameEl,
      h("div", { class: "spacer" }),
      this.statusEl,
      this.queueCountEl,
      h("label", { class: "batch-label" }, "Batch", this.batch),
      this.queueButton,
      h("button", { class: "btn btn-ghost icon-only settings-btn", title: "Settings and keybindings (Ctrl+,)", "aria-label": "Settings", onclick: () => app.settingsDialog.show() }, icon("gear")),
      h("button", { class: "btn btn-ghost icon-only", title: "Toggle side panel", "aria-label": "Toggle side panel", onclick: () => app.side.toggle() }, icon("panel")));
  }

  setName(name: string): void {
    this.nameEl.textContent = name;
  }

  setConnected(connected: boolean): void {
    this.statusEl.classList.toggle("online", connected);
    this.statusEl.querySelector(".conn-text")!.textContent = connected ? "Connected" : "Reconnecting…";
  }

  setQueueCount(n: number): void {
    this.queueCountEl.textContent = `Queue ${n}`;
    this.queueCountEl.classList.toggle("busy", n > 0);
  }

  private async rename(): Promise<void> {
    const name = await promptDialog("Rename workflow", this.app.workflowName, { okText: "Rename" });
    if (name) this.app.setName(name);
  }
}
