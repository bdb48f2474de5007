// The node library: every node type from /object_info in a category tree, with a filter.
// Click an entry to add it at the centre of the view, or drag it onto the canvas.
import { clear, h, icon } from "./dom";
import type { SearchEntry } from "./search";

export const DRAG_MIME = "application/x-sdflow-node";

interface Tree {
  children: Map<string, Tree>;
  items: SearchEntry[];
}

function buildTree(entries: SearchEntry[]): Tree {
  const root: Tree = { children: new Map(), items: [] };
  for (const e of entries) {
    let t = root;
    for (const part of (e.category || "uncategorized").split("/").filter(Boolean)) {
      let next = t.children.get(part);
      if (!next) t.children.set(part, (next = { children: new Map(), items: [] }));
      t = next;
    }
    t.items.push(e);
  }
  return root;
}

export class NodeLibrary {
  readonly el: HTMLElement;
  private filter: HTMLInputElement;
  private body: HTMLElement;
  private expanded = new Set<string>();

  constructor(private entries: () => SearchEntry[], private onAdd: (entry: SearchEntry) => void) {
    this.filter = h("input", { class: "input library-filter", type: "search", placeholder: "Filter nodes…", spellcheck: false, "aria-label": "Filter nodes" });
    this.filter.addEventListener("input", () => this.render());
    this.filter.addEventListener("keydown", (e) => e.stopPropagation());
    this.body = h("div", { class: "library-tree" });
    this.el = h("div", { class: "library" }, this.filter, this.body);
  }

  render(): void {
    clear(this.body);
    const q = this.filter.value.trim().toLowerCase();
    const all = this.entries();
    if (q) {
      const hits = all.filter((e) => `${e.title} ${e.name} ${e.category} ${e.description}`.toLowerCase().includes(q));
      hits.sort((a, b) => a.title.localeCompare(b.title));
      for (const e of hits) this.body.append(this.item(e, 0));
      if (!hits.length) this.body.append(h("div", { class: "empty" }, "No nodes match"));
      return;
    }
    this.renderTree(buildTree(all), "", 0, this.body);
  }

  private renderTree(tree: Tree, path: string, depth: number, into: HTMLElement): void {
    const cats = [...tree.children.keys()].sort((a, b) => a.localeCompare(b));
    for (const name of cats) {
      const sub = tree.children.get(name)!;
      const full = path ? `${path}/${name}` : name;
      const open = this.expanded.has(full);
      const count = countItems(sub);
      const head = h("div", {
        class: `library-cat${open ? " open" : ""}`,
        style: { paddingLeft: `${8 + depth * 14}px` },
        dataset: { category: full },
        onclick: () => {
          if (open) this.expanded.delete(full);
          else this.expanded.add(full);
          this.render();
        },
      }, icon("chevron"), h("span", {}, name), h("span", { class: "count" }, String(count)));
      into.append(head);
      if (open) this.renderTree(sub, full, depth + 1, into);
    }
    const items = [...tree.items].sort((a, b) => a.title.localeCompare(b.title));
    for (const e of items) into.append(this.item(e, depth));
  }

  private item(e: SearchEntry, depth: number): HTMLElement {
    const el = h("div", {
      class: "library-item",
      draggable: true,
      title: e.description ? `${e.title}\n\n${e.description}` : e.title,
      style: { paddingLeft: `${22 + depth * 14}px` },
      dataset: { type: e.name },
      onclick: () => this.onAdd(e),
    }, h("span", { class: "library-item-title" }, e.title));
    el.addEventListener("dragstart", (ev) => {
      ev.dataTransfer?.setData(DRAG_MIME, e.name);
      ev.dataTransfer?.setData("text/plain", e.name);
      if (ev.dataTransfer) ev.dataTransfer.effectAllowed = "copy";
    });
    return el;
  }
}

function countItems(t: Tree): number {
  let n = t.items.length;
  for (const c of t.children.values()) n += countItems(c);
  return n;
}
