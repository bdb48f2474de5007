// The templates browser: the server's workflow templates in the two shapes ComfyUI's front end reads
// (`/templates/index.json` categories, with `/templates/<name>.json` and a `<name>-1.<ext>` thumbnail;
// `/api/workflow_templates` {module: [names]}, with `/api/workflow_templates/<module>/<name>.json`), and
// the workflows saved on the server. Index templates show their picture; the others a drawing of the graph.
import type { Api } from "../api";
import { clear, h, icon } from "./dom";
import { toast } from "./toast";
import { parseWorkflowList, unwrapWorkflow } from "./workflows";

export interface TemplateEntry {
  /** Stable key (the test hook and data-key use it). */
  key: string;
  title: string;
  description?: string;
  section: string;
  load: () => Promise<unknown>;
  thumbnail?: string;
}

interface IndexTemplate {
  name: string;
  title?: string;
  description?: string;
  mediaType?: string;
  mediaSubtype?: string;
}

interface IndexCategory {
  moduleName?: string;
  title?: string;
  category?: string;
  templates?: IndexTemplate[];
}

async function jsonOf(res: Response): Promise<unknown> {
  if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
  return res.json();
}

/** Gathers every template the server offers; sources that are missing are left out. */
export async function gatherTemplates(api: Api): Promise<TemplateEntry[]> {
  const out: TemplateEntry[] = [];
  const [index, modules, saved] = await Promise.allSettled([
    api.fetchRoot("/templates/index.json").then(jsonOf),
    api.listWorkflowTemplates(),
    api.listWorkflows(),
  ]);
  if (index.status === "fulfilled" && Array.isArray(index.value)) {
    for (const cat of index.value as IndexCategory[]) {
      for (const t of cat.templates ?? []) {
        if (!t?.name) continue;
        const ext = t.mediaSubtype || "webp";
        out.push({
          key: `templates/${t.name}`,
          title: t.title || t.name.replace(/[_-]+/g, " "),
          description: t.description,
          section: cat.title || cat.category || "Templates",
          thumbnail: t.mediaType === "image" || !t.mediaType ? `/templates/${t.name}-1.${ext}` : undefined,
          load: () => api.fetchRoot(`/templates/${encodeURIComponent(t.name)}.json`).then(jsonOf),
        });
      }
    }
  }
  if (modules.status === "fulfilled" && modules.value && typeof modules.value === "object") {
    for (const [module, names] of Object.entries(modules.value)) {
      for (const name of Array.isArray(names) ? names : []) {
        const base = `/api/workflow_templates/${encodeURIComponent(module)}/${encodeURIComponent(name)}`;
        out.push({
          key: `${module}/${name}`,
          title: name.replace(/[_-]+/g, " "),
          section: module,
          // Drawn from the graph: sdflow's server offers only a title card for its examples.
          load: () => api.fetchRoot(`${base}.json`).then(jsonOf),
        });
      }
    }
  }
  if (saved.status === "fulfilled") {
    for (const f of parseWorkflowList(saved.value)) {
      const label = f.name.replace(/\.json$/i, "");
      out.push({
        key: `saved/${label}`,
        title: label,
        section: "Saved workflows",
        load: async () => unwrapWorkflow(await api.loadWorkflowFile(f.name)),
      });
    }
  }
  return out;
}

/** Draws a workflow's nodes and links into a small canvas (the thumbnail of a template without one). */
export function drawGraphThumbnail(canvas: HTMLCanvasElement, wf: any): void {
  const ctx = canvas.getContext("2d");
  const nodes: any[] = Array.isArray(wf?.nodes) ? wf.nodes : [];
  if (!ctx || !nodes.length) return;
  const rect = (n: any): [number, number, number, number] => {
    const p = Array.isArray(n.pos) ? n.pos : [n.pos?.[0] ?? 0, n.pos?.[1] ?? 0];
    const s = Array.isArray(n.size) ? n.size : [200, 100];
    return [Number(p[0]) || 0, (Number(p[1]) || 0) - 30, Number(s[0]) || 200, (Number(s[1]) || 100) + 30];
  };
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    const [x, y, w, hh] = rect(n);
    x0 = Math.min(x0, x);
    y0 = Math.min(y0, y);
    x1 = Math.max(x1, x + w);
    y1 = Math.max(y1, y + hh);
  }
  const W = canvas.width, H = canvas.height, pad = 10;
  const s = Math.min((W - 2 * pad) / (x1 - x0 || 1), (H - 2 * pad) / (y1 - y0 || 1));
  const ox = pad + (W - 2 * pad - (x1 - x0) * s) / 2 - x0 * s;
  const oy = pad + (H - 2 * pad - (y1 - y0) * s) / 2 - y0 * s;
  ctx.fillStyle = "#14161b";
  ctx.fillRect(0, 0, W, H);
  const byId = new Map(nodes.map((n) => [n.id, rect(n)]));
  ctx.strokeStyle = "rgba(138,148,166,0.7)";
  ctx.lineWidth = 1;
  for (const l of Array.isArray(wf.links) ? wf.links : []) {
    const a = byId.get(Array.isArray(l) ? l[1] : l?.origin_id);
    const b = byId.get(Array.isArray(l) ? l[3] : l?.target_id);
    if (!a || !b) continue;
    const ax = ox + (a[0] + a[2]) * s, ay = oy + (a[1] + 40) * s;
    const bx = ox + b[0] * s, by = oy + (b[1] + 40) * s;
    ctx.beginPath();
    ctx.moveTo(ax, ay);
    ctx.bezierCurveTo(ax + 20, ay, bx - 20, by, bx, by);
    ctx.stroke();
  }
  for (const n of nodes) {
    const [x, y, w, hh] = rect(n);
    ctx.fillStyle = "#262a33";
    ctx.fillRect(ox + x * s, oy + y * s, w * s, hh * s);
    ctx.fillStyle = n.color || "#3a4150";
    ctx.fillRect(ox + x * s, oy + y * s, w * s, Math.max(2, 30 * s));
  }
}

export class TemplatesBrowser {
  private backdrop: HTMLElement | null = null;

  constructor(private api: Api, private open: (wf: unknown, name: string) => Promise<boolean>) {}

  get isOpen(): boolean {
    return !!this.backdrop;
  }

  close(): void {
    this.backdrop?.remove();
    this.backdrop = null;
    document.removeEventListener("keydown", this.onKey, true);
  }

  private onKey = (e: KeyboardEvent) => {
    if (e.key === "Escape") {
      e.stopPropagation();
      this.close();
    }
  };

  async show(): Promise<void> {
    this.close();
    const body = h("div", { class: "templates-body" }, h("div", { class: "empty" }, "Loading templates…"));
    const filter = h("input", { class: "input templates-filter", type: "search", placeholder: "Filter templates", spellcheck: false });
    const box = h("div", { class: "modal modal-templates", role: "dialog", "aria-label": "Templates" },
      h("div", { class: "templates-head" }, h("h2", {}, "Templates"), filter,
        h("button", { class: "icon-btn", title: "Close", "aria-label": "Close", onclick: () => this.close() }, icon("x"))),
      body);
    this.backdrop = h("div", { class: "modal-backdrop" }, box);
    this.backdrop.addEventListener("pointerdown", (e) => {
      if (e.target === this.backdrop) this.close();
    });
    document.addEventListener("keydown", this.onKey, true);
    document.body.append(this.backdrop);
    filter.focus();
    const entries = await gatherTemplates(this.api);
    const render = () => {
      clear(body);
      const q = filter.value.trim().toLowerCase();
      const shown = entries.filter((e) => !q || `${e.title} ${e.description ?? ""} ${e.section}`.toLowerCase().includes(q));
      if (!shown.length) {
        body.append(h("div", { class: "empty" }, entries.length ? "No template matches." : "The server offers no templates or saved workflows."));
        return;
      }
      const sections = [...new Set(shown.map((e) => e.section))];
      for (const sec of sections) {
        body.append(h("h3", { class: "templates-section" }, sec),
          h("div", { class: "templates-grid" }, shown.filter((e) => e.section === sec).map((e) => this.card(e))));
      }
    };
    filter.addEventListener("input", render);
    filter.addEventListener("keydown", (e) => e.stopPropagation());
    render();
    box.dataset.ready = "1";
  }

  private card(e: TemplateEntry): HTMLElement {
    const canvas = h("canvas", { class: "template-thumb", width: 240, height: 150 });
    const fallback = () => e.load().then((wf) => drawGraphThumbnail(canvas, wf)).catch(() => {});
    let thumb: HTMLElement = canvas;
    if (e.thumbnail) {
      // Relative to the page, so a server mounted under a path prefix works too.
      const img = h("img", { class: "template-thumb", alt: "", src: e.thumbnail.replace(/^\//, "") });
      img.onerror = () => {
        img.replaceWith(canvas);
        fallback();
      };
      thumb = img;
    } else fallback();
    return h("button", {
      class: "template-card",
      dataset: { key: e.key },
      title: e.description ?? e.title,
      onclick: () => this.pick(e),
    }, thumb, h("span", { class: "template-title" }, e.title), e.description ? h("span", { class: "template-desc" }, e.description) : null);
  }

  private async pick(e: TemplateEntry): Promise<void> {
    let wf: unknown;
    try {
      wf = await e.load();
    } catch (err) {
      toast(`Cannot load the template ${e.title}: ${err instanceof Error ? err.message : err}`, "error");
      return;
    }
    this.close();
    await this.open(wf, e.title);
  }
}
