// Workflows saved on the server (the user directory), listed and loaded from the side panel.
import type { Api } from "../api";
import { clear, h, icon } from "./dom";
import { confirmDialog } from "./dialog";
import { toast } from "./toast";

export interface WorkflowFile {
  name: string;
  modified?: number;
  size?: number;
}

/** Accepts a list of names or of objects, bare or under a `workflows` key. */
export function parseWorkflowList(data: unknown): WorkflowFile[] {
  const arr = Array.isArray(data) ? data : Array.isArray((data as any)?.workflows) ? (data as any).workflows : [];
  const out: WorkflowFile[] = [];
  for (const item of arr) {
    if (typeof item === "string") out.push({ name: item });
    else if (item && typeof item === "object") {
      const name = item.name ?? item.path ?? item.filename ?? item.file;
      if (typeof name === "string") {
        const modified = typeof item.modified === "number" ? item.modified : typeof item.mtime === "number" ? item.mtime : undefined;
        out.push({ name, modified, size: typeof item.size === "number" ? item.size : undefined });
      }
    }
  }
  return out;
}

/** The workflow body of a load response: either the workflow itself or wrapped in `workflow`. */
export function unwrapWorkflow(data: any): unknown {
  if (data && typeof data === "object" && data.workflow && typeof data.workflow === "object" && !Array.isArray(data.nodes)) return data.workflow;
  return data;
}

export class WorkflowsPanel {
  readonly el: HTMLElement;
  private list: HTMLElement;
  available = true;

  constructor(private api: Api, private onLoad: (data: unknown, name: string) => void, private onSave: () => void) {
    const head = h("div", { class: "panel-actions" },
      h("button", { class: "btn btn-sm", onclick: () => this.onSave() }, icon("save"), "Save current"),
      h("button", { class: "btn btn-sm", onclick: () => this.refresh() }, icon("refresh"), "Refresh"));
    this.list = h("div", { class: "workflow-list" });
    this.el = h("div", { class: "workflows-panel" }, head, this.list);
  }

  async refresh(): Promise<void> {
    let files: WorkflowFile[];
    try {
      files = parseWorkflowList(await this.api.listWorkflows());
      this.available = true;
    } catch (e) {
      this.available = false;
      clear(this.list);
      this.list.append(h("div", { class: "empty" }, "This server does not store workflows; use Save to download a file."));
      return;
    }
    clear(this.list);
    if (!files.length) {
      this.list.append(h("div", { class: "empty" }, "No saved workflows yet. Press Ctrl+S to save the current graph."));
      return;
    }
    files.sort((a, b) => a.name.localeCompare(b.name));
    for (const f of files) {
      const label = f.name.replace(/\.json$/i, "");
      this.list.append(h("div", { class: "workflow-item", dataset: { name: label }, title: `Load ${label}`, onclick: () => this.load(f.name) },
        icon("open"), h("span", { class: "workflow-item-name" }, label),
        h("button", {
          class: "icon-btn",
          title: `Delete ${label}`,
          onclick: (e: Event) => {
            e.stopPropagation();
            this.remove(label);
          },
        }, icon("trash"))));
    }
  }

  async remove(name: string): Promise<void> {
    if (!(await confirmDialog("Delete workflow", `Delete the saved workflow “${name}”?`, "Delete"))) return;
    try {
      await this.api.deleteWorkflowFile(name);
    } catch (e) {
      toast(`Could not delete ${name}: ${e instanceof Error ? e.message : e}`, "error");
    }
    this.refresh();
  }

  async load(name: string): Promise<void> {
    try {
      const data = unwrapWorkflow(await this.api.loadWorkflowFile(name));
      this.onLoad(data, name.replace(/\.json$/i, ""));
    } catch (e) {
      toast(`Could not load ${name}: ${e instanceof Error ? e.message : e}`, "error");
    }
  }
}
