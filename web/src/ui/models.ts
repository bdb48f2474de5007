// The model library: the server's model folders and their files. Dragging a model onto the canvas
// (or clicking it) adds the node that loads it, with the file chosen.
import type { Api } from "../api";
import type { ObjectInfo } from "../schema";
import { clear, h, icon } from "./dom";

export const MODEL_MIME = "application/x-sdflow-model";

/** The usual loader of each folder, ComfyUI's classes and input names. */
const LOADERS: Record<string, [string, string]> = {
  checkpoints: ["CheckpointLoaderSimple", "ckpt_name"],
  loras: ["LoraLoader", "lora_name"],
  vae: ["VAELoader", "vae_name"],
  controlnet: ["ControlNetLoader", "control_net_name"],
  upscale_models: ["UpscaleModelLoader", "model_name"],
  diffusers: ["DiffusersLoader", "model_path"],
  clip: ["CLIPLoader", "clip_name"],
  unet: ["UNETLoader", "unet_name"],
  diffusion_models: ["UNETLoader", "unet_name"],
  clip_vision: ["CLIPVisionLoader", "clip_name"],
  style_models: ["StyleModelLoader", "style_model_name"],
  gligen: ["GLIGENLoader", "gligen_name"],
};

/** The loader node and input for a model file, if the server has one. */
export function loaderFor(info: ObjectInfo, folder: string, file: string): { type: string; input: string } | null {
  const known = LOADERS[folder];
  if (known && info[known[0]]) return { type: known[0], input: known[1] };
  // Otherwise any node whose required combo lists this very file.
  for (const [type, def] of Object.entries(info)) {
    for (const [input, spec] of Object.entries((def as any)?.input?.required ?? {})) {
      const values = Array.isArray(spec) ? spec[0] : undefined;
      if (Array.isArray(values) && values.includes(file)) return { type, input };
    }
  }
  return null;
}

export class ModelLibrary {
  readonly el: HTMLElement;
  private list: HTMLElement;
  private filter: HTMLInputElement;
  private data: [string, string[]][] = [];

  constructor(private api: Api, private info: () => ObjectInfo, private add: (folder: string, file: string) => void) {
    this.filter = h("input", { class: "input library-filter model-filter", type: "search", placeholder: "Filter models", spellcheck: false });
    this.filter.addEventListener("input", () => this.render());
    this.filter.addEventListener("keydown", (e) => e.stopPropagation());
    this.list = h("div", { class: "model-list" });
    this.el = h("div", { class: "models-panel" },
      h("div", { class: "panel-actions" }, this.filter, h("button", { class: "btn btn-sm", title: "Reload the model folders", onclick: () => this.refresh() }, icon("refresh"))),
      this.list);
  }

  async refresh(): Promise<void> {
    try {
      const folders = await this.api.listModelFolders();
      const lists = await Promise.all(folders.map((f) => this.api.listModels(f).catch(() => [] as string[])));
      this.data = folders.map((f, i) => [f, lists[i]]);
    } catch (e) {
      clear(this.list);
      this.list.append(h("div", { class: "empty" }, `Model folders unavailable: ${e instanceof Error ? e.message : e}`));
      return;
    }
    this.render();
  }

  private render(): void {
    clear(this.list);
    const q = this.filter.value.trim().toLowerCase();
    let shown = 0;
    for (const [folder, files] of this.data) {
      const matching = files.filter((f) => !q || f.toLowerCase().includes(q) || folder.includes(q));
      if (!matching.length) continue;
      const items = matching.map((file) => {
        const loader = loaderFor(this.info(), folder, file);
        const el = h("div", {
          class: `model-item${loader ? "" : " no-loader"}`,
          draggable: loader ? "true" : "false",
          dataset: { folder, name: file },
          title: loader ? `${file}\nDrag onto the canvas (or click) for a ${loader.type}` : `${file}\nNo loader node for this folder`,
          onclick: () => loader && this.add(folder, file),
        }, h("span", { class: "model-name" }, file.replace(/\.(safetensors|ckpt|pt|pth|bin)$/i, "")),
          h("span", { class: "model-ext" }, (/\.(\w+)$/.exec(file)?.[1] ?? "").toLowerCase()));
        el.addEventListener("dragstart", (ev) => {
          ev.dataTransfer?.setData(MODEL_MIME, JSON.stringify({ folder, name: file }));
          if (ev.dataTransfer) ev.dataTransfer.effectAllowed = "copy";
        });
        return el;
      });
      shown += items.length;
      this.list.append(h("details", { class: "model-folder", open: true, dataset: { folder } },
        h("summary", {}, folder, h("span", { class: "model-count" }, String(matching.length))), items));
    }
    if (!shown) this.list.append(h("div", { class: "empty" }, this.data.length ? "No model matches." : "The server lists no model folders."));
  }
}
