// The node search box: opened by double-clicking empty canvas, or by releasing a dragged link on
// empty canvas (then only nodes that can take the link are listed).
import { nodeInputs, nodeOutputs, typesCompatible, type NodeDef } from "../schema";
import { clear, h, icon } from "./dom";

export interface SearchEntry {
  name: string;
  title: string;
  category: string;
  description: string;
  def?: NodeDef;
  /** Socket types of inputs and outputs, for link filtering. */
  inputTypes: string[];
  outputTypes: string[];
}

export interface SearchFilter {
  /** "input": the new node must accept `type`; "output": it must produce it. */
  direction: "input" | "output";
  type: string;
}

export interface SearchOpenOptions {
  clientX: number;
  clientY: number;
  filter?: SearchFilter;
  onPick: (entry: SearchEntry) => void;
  onCancel?: () => void;
}

export function entryFromDef(def: NodeDef): SearchEntry {
  return {
    name: def.name,
    title: def.display_name || def.name,
    category: def.category ?? "",
    description: def.description ?? "",
    def,
    inputTypes: nodeInputs(def).map((i) => i.type),
    outputTypes: nodeOutputs(def).map((o) => o.type),
  };
}

function score(entry: SearchEntry, terms: string[]): number {
  if (!terms.length) return 1;
  const title = entry.title.toLowerCase();
  const name = entry.name.toLowerCase();
  const cat = entry.category.toLowerCase();
  const desc = entry.description.toLowerCase();
  let total = 0;
  for (const t of terms) {
    let s = 0;
    if (title === t || name === t) s = 100;
    else if (title.startsWith(t) || name.startsWith(t)) s = 80;
    else if (title.split(/[\s_()\-/]+/).some((w) => w.startsWith(t))) s = 60;
    else if (title.includes(t) || name.includes(t)) s = 45;
    else if (cat.includes(t)) s = 20;
    else if (desc.includes(t)) s = 10;
    else if (subsequence(title, t) || subsequence(name, t)) s = 5;
    if (!s) return 0;
    total += s;
  }
  return total;
}

function subsequence(hay: string, needle: string): boolean {
  let i = 0;
  for (const c of hay) if (c === needle[i] && ++i === needle.length) return true;
  return false;
}

function accepts(entry: SearchEntry, filter: SearchFilter | undefined): boolean {
  if (!filter) return true;
  if (filter.direction === "input") return entry.inputTypes.some((t) => typesCompatible(filter.type, t));
  return entry.outputTypes.some((t) => typesCompatible(t, filter.type));
}

export class NodeSearch {
  private root: HTMLElement | null = null;
  private input!: HTMLInputElement;
  private list!: HTMLElement;
  private results: SearchEntry[] = [];
  private selected = 0;
  private opts: SearchOpenOptions | null = null;

  constructor(private entries: () => SearchEntry[]) {}

  get isOpen(): boolean {
    return !!this.root;
  }

  open(opts: SearchOpenOptions): void {
    this.close();
    this.opts = opts;
    this.input = h("input", {
      class: "search-input",
      type: "text",
      placeholder: opts.filter ? `Search nodes taking ${opts.filter.type}…` : "Search nodes…",
      spellcheck: false,
      "aria-label": "Search nodes",
    });
    this.list = h("div", { class: "search-results", role: "listbox" });
    const chip = opts.filter
      ? h("div", { class: "search-filter" },
          h("span", { class: "type-chip", dataset: { type: opts.filter.type } }, opts.filter.type),
          opts.filter.direction === "input" ? " → input" : " ← output")
      : null;
    this.root = h("div", { class: "search-box", role: "dialog" },
      h("div", { class: "search-head" }, icon("search"), this.input), chip, this.list);
    document.body.append(this.root);
    // Keep the box on screen.
    const w = 440;
    const x = Math.min(Math.max(8, opts.clientX - 40), window.innerWidth - w - 8);
    const y = Math.min(Math.max(8, opts.clientY - 20), window.innerHeight - 420);
    Object.assign(this.root.style, { left: `${x}px`, top: `${Math.max(8, y)}px`, width: `${w}px` });

    this.input.addEventListener("input", () => this.refresh());
    this.input.addEventListener("keydown", (e) => this.onKey(e));
    this.root.addEventListener("pointerdown", (e) => e.stopPropagation());
    setTimeout(() => document.addEventListener("pointerdown", this.outside, true), 0);
    this.refresh();
    // Near the bottom of the window the box opens upwards, so its list is never cut off.
    const height = this.root.getBoundingClientRect().height;
    if (y + height > window.innerHeight - 8) this.root.style.top = `${Math.max(8, window.innerHeight - height - 8)}px`;
    this.input.focus();
    requestAnimationFrame(() => this.input.focus());
  }

  private outside = (e: Event) => {
    if (this.root && !this.root.contains(e.target as Node)) this.cancel();
  };

  private cancel(): void {
    const cb = this.opts?.onCancel;
    this.close();
    cb?.();
  }

  close(): void {
    document.removeEventListener("pointerdown", this.outside, true);
    this.root?.remove();
    this.root = null;
  }

  private refresh(): void {
    const terms = this.input.value.toLowerCase().split(/\s+/).filter(Boolean);
    const scored: [number, SearchEntry][] = [];
    for (const e of this.entries()) {
      if (!accepts(e, this.opts?.filter)) continue;
      const s = score(e, terms);
      if (s > 0) scored.push([s, e]);
    }
    scored.sort((a, b) => b[0] - a[0] || a[1].title.length - b[1].title.length || a[1].title.localeCompare(b[1].title));
    this.results = scored.slice(0, 80).map((x) => x[1]);
    this.selected = 0;
    this.render();
  }

  private render(): void {
    clear(this.list);
    if (!this.results.length) {
      this.list.append(h("div", { class: "search-empty" }, "No matching nodes"));
      return;
    }
    this.results.forEach((e, i) => {
      const item = h("div", {
        class: `search-item${i === this.selected ? " selected" : ""}`,
        role: "option",
        title: e.description || e.title,
        dataset: { type: e.name },
        onpointerdown: (ev: PointerEvent) => {
          ev.preventDefault();
          this.pick(i);
        },
        onpointermove: () => {
          if (this.selected !== i) {
            this.selected = i;
            this.highlight();
          }
        },
      },
        h("div", { class: "search-item-main" },
          h("span", { class: "search-item-title" }, e.title),
          e.title !== e.name ? h("span", { class: "search-item-name" }, e.name) : null,
          h("span", { class: "search-item-cat" }, e.category)),
        e.description ? h("div", { class: "search-item-desc" }, e.description) : null);
      this.list.append(item);
    });
  }

  private highlight(): void {
    this.list.querySelectorAll(".search-item").forEach((el, i) => el.classList.toggle("selected", i === this.selected));
    this.list.children[this.selected]?.scrollIntoView({ block: "nearest" });
  }

  private onKey(e: KeyboardEvent): void {
    e.stopPropagation();
    if (e.key === "ArrowDown") {
      this.selected = Math.min(this.results.length - 1, this.selected + 1);
      this.highlight();
    } else if (e.key === "ArrowUp") {
      this.selected = Math.max(0, this.selected - 1);
      this.highlight();
    } else if (e.key === "Enter") {
      this.pick(this.selected);
    } else if (e.key === "Escape") {
      this.cancel();
    } else return;
    e.preventDefault();
  }

  private pick(i: number): void {
    const entry = this.results[i];
    const cb = this.opts?.onPick;
    this.close();
    if (entry && cb) cb(entry);
  }
}
