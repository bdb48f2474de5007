// Workflow tabs: each tab owns a workflow, its undo history, the outputs its runs produced and an
// unsaved mark. One litegraph graph shows the active tab; switching serialises it into its tab and
// configures the graph from the other one, so every part of the editor keeps working on `app.graph`.
import type { ImageRef } from "./api";
import type { ISerialisedGraph } from "./lgtypes";
import { h, icon } from "./ui/dom";
import type { HistoryState } from "./undo";

export interface NodeOutput {
  type: string;
  images: HTMLImageElement[];
  refs: ImageRef[];
}

export interface WorkflowTab {
  id: string;
  name: string;
  /** The graph while another tab is shown (the live graph holds it while active). */
  workflow: ISerialisedGraph | null;
  history: HistoryState | null;
  /** Snapshot (as the undo history records it) at the last load or save: differs ⇒ unsaved. */
  clean: string;
  dirty: boolean;
  /** Output images by node id, kept with the tab so undo and tab switches bring them back. */
  outputs: Map<string, NodeOutput>;
}

export interface StoredTabs {
  active: string;
  tabs: { id: string; name: string; workflow: ISerialisedGraph | null; dirty: boolean; clean?: string }[];
}

let seq = 0;

export function newTabId(): string {
  seq += 1;
  return `t${Date.now().toString(36)}${seq}`;
}

export function makeTab(name: string, workflow: ISerialisedGraph | null = null): WorkflowTab {
  return { id: newTabId(), name, workflow, history: null, clean: "", dirty: false, outputs: new Map() };
}

export interface TabBarActions {
  select(id: string): void;
  close(id: string): void;
  add(): void;
}

/** The strip of tabs above the canvas. */
export class TabBar {
  readonly el: HTMLElement;
  private strip: HTMLElement;

  constructor(private actions: TabBarActions) {
    this.strip = h("div", { class: "wf-tabs", role: "tablist" });
    const add = h("button", { class: "wf-tab-add icon-btn", title: "New workflow tab", "aria-label": "New workflow tab", onclick: () => actions.add() }, icon("plus"));
    this.el = h("div", { class: "wf-tabbar" }, this.strip, add);
  }

  render(tabs: WorkflowTab[], active: string): void {
    this.strip.replaceChildren(...tabs.map((t) => {
      const close = h("button", {
        class: "wf-tab-close",
        title: `Close ${t.name}`,
        "aria-label": `Close ${t.name}`,
        onclick: (e: Event) => {
          e.stopPropagation();
          this.actions.close(t.id);
        },
      }, icon("x"));
      return h("div", {
        class: `wf-tab${t.id === active ? " active" : ""}${t.dirty ? " dirty" : ""}`,
        role: "tab",
        title: t.dirty ? `${t.name} (unsaved changes)` : t.name,
        dataset: { tabId: t.id, name: t.name },
        onclick: () => this.actions.select(t.id),
        onauxclick: (e: MouseEvent) => {
          if (e.button === 1) this.actions.close(t.id);
        },
      }, h("span", { class: "wf-tab-name" }, t.name), h("span", { class: "wf-tab-dot", "aria-label": "unsaved" }), close);
    }));
  }
}
