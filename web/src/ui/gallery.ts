// The gallery: every image of the server's history as a grid, newest first. An image opens in a
// viewer with the prompt that made it (sampler settings, prompts, model) and the image actions:
// load its workflow, open, save, copy, send to a LoadImage node.
import type { Api, HistoryEntry, ImageRef } from "../api";
import { cachedImageUrl } from "./queue";
import { clear, h, icon } from "./dom";
import { toast } from "./toast";

export interface ImageActions {
  loadWorkflow(data: unknown, name: string): void;
  sendToLoadImage(ref: ImageRef): void;
}

interface GalleryItem {
  promptId: string;
  entry: HistoryEntry;
  ref: ImageRef;
}

/** What a person wants to know about the run that made an image, read from its API prompt. */
export function promptSummary(prompt: Record<string, any> | undefined): [string, string][] {
  const rows: [string, string][] = [];
  if (!prompt || typeof prompt !== "object") return rows;
  const nodes = Object.entries(prompt);
  const textOf = (link: unknown): string | undefined => {
    if (!Array.isArray(link)) return undefined;
    const src = prompt[String(link[0])];
    const t = src?.inputs?.text;
    return typeof t === "string" ? t : undefined;
  };
  for (const [, n] of nodes) {
    const inp = n?.inputs ?? {};
    if (typeof inp.ckpt_name === "string") rows.push(["Model", inp.ckpt_name]);
  }
  for (const [id, n] of nodes) {
    const inp = n?.inputs ?? {};
    if (!("sampler_name" in inp)) continue;
    const pos = textOf(inp.positive);
    const neg = textOf(inp.negative);
    if (pos !== undefined) rows.push(["Prompt", pos]);
    if (neg !== undefined) rows.push(["Negative", neg]);
    const parts = ["seed", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"]
      .filter((k) => k in inp && !Array.isArray(inp[k])).map((k) => `${k} ${inp[k]}`);
    rows.push([`${n.class_type ?? "Sampler"} #${id}`, parts.join(", ")]);
  }
  return rows;
}

function viewUrl(api: Api, ref: ImageRef): string {
  return api.url(api.viewPath(ref).replace(/^\/?api/, ""));
}

async function imageBlob(api: Api, ref: ImageRef): Promise<Blob> {
  const res = await api.fetchApi(api.viewPath(ref).replace(/^\/?api/, ""));
  if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
  return res.blob();
}

/** Download, open in a new browser tab, copy to the clipboard. */
export async function saveImage(api: Api, ref: ImageRef): Promise<void> {
  const blob = await imageBlob(api, ref);
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: ref.filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function openImage(api: Api, ref: ImageRef): void {
  window.open(viewUrl(api, ref), "_blank", "noopener");
}

export async function copyImage(api: Api, ref: ImageRef): Promise<void> {
  let blob = await imageBlob(api, ref);
  // The clipboard takes PNG only.
  if (blob.type !== "image/png") {
    const bmp = await createImageBitmap(blob);
    const c = h("canvas", { width: bmp.width, height: bmp.height });
    c.getContext("2d")!.drawImage(bmp, 0, 0);
    blob = await new Promise<Blob>((res, rej) => c.toBlob((b) => (b ? res(b) : rej(new Error("cannot encode PNG"))), "image/png"));
  }
  await navigator.clipboard.write([new ClipboardItem({ "image/png": blob })]);
  toast("Image copied", "success", { timeout: 1500 });
}

export class GalleryPanel {
  readonly el: HTMLElement;
  private grid: HTMLElement;
  private items: GalleryItem[] = [];

  constructor(private api: Api, private actions: ImageActions) {
    const head = h("div", { class: "panel-actions" },
      h("button", { class: "btn btn-sm", onclick: () => this.refresh() }, icon("refresh"), "Refresh"));
    this.grid = h("div", { class: "gallery-grid" });
    this.el = h("div", { class: "gallery-panel" }, head, this.grid);
  }

  async refresh(): Promise<void> {
    let data: Record<string, HistoryEntry>;
    try {
      data = await this.api.getHistory(200);
    } catch (e) {
      clear(this.grid);
      this.grid.append(h("div", { class: "empty" }, `History unavailable: ${e instanceof Error ? e.message : e}`));
      return;
    }
    this.items = [];
    for (const [promptId, entry] of Object.entries(data ?? {}).reverse()) {
      for (const out of Object.values(entry.outputs ?? {})) {
        for (const ref of (out?.images ?? []) as ImageRef[]) {
          if ((ref.type ?? "output") === "output") this.items.push({ promptId, entry, ref });
        }
      }
    }
    clear(this.grid);
    if (!this.items.length) {
      this.grid.append(h("div", { class: "empty" }, "No saved images yet. Images from Save Image nodes appear here."));
      return;
    }
    this.items.forEach((item, i) => {
      const img = h("img", { class: "gallery-thumb", alt: item.ref.filename, title: item.ref.filename, loading: "lazy" });
      cachedImageUrl(this.api, item.ref).then((url) => (img.src = url)).catch(() => img.classList.add("broken"));
      this.grid.append(h("button", {
        class: "gallery-item",
        dataset: { promptId: item.promptId, filename: item.ref.filename },
        onclick: () => void this.view(i),
      }, img));
    });
  }

  /** The viewer: the image large, its run's settings, and the actions. Arrow keys step through. */
  async view(index: number): Promise<void> {
    const item = this.items[index];
    if (!item) return;
    document.querySelector(".gallery-viewer")?.remove();
    const url = await cachedImageUrl(this.api, item.ref);
    const prompt = item.entry.prompt?.[2];
    const workflow = item.entry.prompt?.[3]?.extra_pnginfo?.workflow;
    const close = () => {
      box.remove();
      document.removeEventListener("keydown", onKey, true);
    };
    const act = (label: string, iconName: string, fn: () => unknown, cls = "") =>
      h("button", {
        class: `btn btn-sm ${cls}`,
        dataset: { action: label },
        onclick: async () => {
          try {
            await fn();
          } catch (e) {
            toast(`${label} failed: ${e instanceof Error ? e.message : e}`, "error");
          }
        },
      }, icon(iconName), label);
    const meta = h("dl", { class: "gallery-meta" }, promptSummary(prompt).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const box = h("div", { class: "gallery-viewer", role: "dialog", "aria-label": item.ref.filename, dataset: { filename: item.ref.filename } },
      h("div", { class: "gallery-stage", onclick: (e: Event) => { if (e.target === e.currentTarget) close(); } },
        h("img", { src: url, alt: item.ref.filename })),
      h("aside", { class: "gallery-side" },
        h("div", { class: "gallery-side-head" }, h("span", { class: "gallery-name" }, item.ref.filename),
          h("button", { class: "icon-btn", title: "Close", "aria-label": "Close", onclick: close }, icon("x"))),
        h("div", { class: "gallery-actions" },
          act("Load workflow", "open", () => {
            close();
            this.actions.loadWorkflow(workflow ?? prompt, item.ref.filename.replace(/\.\w+$/, ""));
          }, "btn-primary"),
          act("Open", "image", () => openImage(this.api, item.ref)),
          act("Save", "download", () => saveImage(this.api, item.ref)),
          act("Copy", "save", () => copyImage(this.api, item.ref)),
          act("Send to LoadImage", "plus", () => {
            close();
            this.actions.sendToLoadImage(item.ref);
          })),
        meta));
    const onKey = (e: KeyboardEvent) => {
      if (e.key === "Escape") {
        e.stopPropagation();
        close();
      } else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.stopPropagation();
        close();
        void this.view(index + (e.key === "ArrowRight" ? 1 : -1));
      }
    };
    document.addEventListener("keydown", onKey, true);
    document.body.append(box);
  }
}
