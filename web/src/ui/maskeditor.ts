// The mask editor for LoadImage, as ComfyUI's: paint (left button) or erase (right button, or the
// Erase tool) over the image; Save uploads the mask to `/upload/mask`, which stores a copy of the
// original image with the mask as its alpha channel (transparent = masked) in input/clipspace, and the
// node then loads that copy, so its MASK output is the painted area.
import type { Api, ImageRef } from "../api";
import { h, icon } from "./dom";
import { toast } from "./toast";

const MASK_RGB = [92, 170, 255];

export interface MaskSaved {
  /** The LoadImage value of the masked copy ("clipspace/name.png [input]"). */
  value: string;
}

export class MaskEditor {
  private box: HTMLElement | null = null;
  /** The open editor's mask canvas (the test hook maps image pixels to the screen with it). */
  maskCanvas: HTMLCanvasElement | null = null;

  constructor(private api: Api) {}

  get isOpen(): boolean {
    return !!this.box;
  }

  close(): void {
    this.box?.remove();
    this.box = null;
    this.maskCanvas = null;
  }

  async open(ref: ImageRef, onSaved: (r: MaskSaved) => void): Promise<void> {
    this.close();
    const url = await this.api.fetchImageUrl(ref);
    const img = await new Promise<HTMLImageElement>((res, rej) => {
      const i = new Image();
      i.onload = () => res(i);
      i.onerror = () => rej(new Error(`cannot decode ${ref.filename}`));
      i.src = url;
    });
    const w = img.naturalWidth, hgt = img.naturalHeight;
    const base = h("canvas", { class: "mask-base", width: w, height: hgt });
    base.getContext("2d")!.drawImage(img, 0, 0);
    const mask = h("canvas", { class: "mask-layer", width: w, height: hgt });
    const mctx = mask.getContext("2d")!;
    // An existing alpha channel is the current mask.
    const src = base.getContext("2d")!.getImageData(0, 0, w, hgt);
    const start = mctx.createImageData(w, hgt);
    for (let i = 0; i < src.data.length; i += 4) {
      const masked = 255 - src.data[i + 3];
      start.data.set([MASK_RGB[0], MASK_RGB[1], MASK_RGB[2], masked], i);
    }
    mctx.putImageData(start, 0, 0);
    // Show the image without its transparency, so the masked area is visible under the paint.
    const opaque = base.getContext("2d")!.getImageData(0, 0, w, hgt);
    for (let i = 3; i < opaque.data.length; i += 4) opaque.data[i] = 255;
    base.getContext("2d")!.putImageData(opaque, 0, 0);

    let tool: "paint" | "erase" = "paint";
    const size = h("input", { type: "range", min: "1", max: "200", value: String(Math.max(4, Math.round(Math.min(w, hgt) / 12))), class: "mask-size", "aria-label": "Brush size" });
    const sizeText = h("span", { class: "mask-size-text" }, `${size.value} px`);
    size.addEventListener("input", () => (sizeText.textContent = `${size.value} px`));
    const toolBtn = (t: "paint" | "erase", label: string) => h("button", {
      class: `btn btn-sm mask-tool${t === tool ? " active" : ""}`,
      dataset: { tool: t },
      onclick: () => {
        tool = t;
        for (const b of this.box!.querySelectorAll(".mask-tool")) b.classList.toggle("active", (b as HTMLElement).dataset.tool === t);
      },
    }, label);
    const stage = h("div", { class: "mask-stage" }, h("div", { class: "mask-frame", style: { aspectRatio: `${w} / ${hgt}` } }, base, mask));

    let last: [number, number] | null = null;
    let erasing = false;
    const toImage = (e: PointerEvent): [number, number] => {
      const r = mask.getBoundingClientRect();
      return [((e.clientX - r.left) * w) / r.width, ((e.clientY - r.top) * hgt) / r.height];
    };
    const stroke = (a: [number, number], b: [number, number]) => {
      mctx.save();
      mctx.globalCompositeOperation = erasing ? "destination-out" : "source-over";
      mctx.strokeStyle = `rgb(${MASK_RGB.join(",")})`;
      mctx.fillStyle = mctx.strokeStyle;
      mctx.lineWidth = Number(size.value);
      mctx.lineCap = "round";
      mctx.lineJoin = "round";
      mctx.beginPath();
      mctx.moveTo(a[0], a[1]);
      mctx.lineTo(b[0] + 0.01, b[1]);
      mctx.stroke();
      mctx.restore();
    };
    mask.addEventListener("contextmenu", (e) => e.preventDefault());
    mask.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      mask.setPointerCapture(e.pointerId);
      erasing = tool === "erase" || e.button === 2;
      last = toImage(e);
      stroke(last, last);
    });
    mask.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = toImage(e);
      stroke(last, p);
      last = p;
    });
    const end = () => (last = null);
    mask.addEventListener("pointerup", end);
    mask.addEventListener("pointercancel", end);

    const save = async () => {
      const data = mctx.getImageData(0, 0, w, hgt);
      const out = h("canvas", { width: w, height: hgt });
      const octx = out.getContext("2d")!;
      const od = octx.createImageData(w, hgt);
      // The server takes only the alpha channel: opaque where unmasked, transparent where masked.
      for (let i = 0; i < data.data.length; i += 4) od.data[i + 3] = 255 - data.data[i + 3];
      octx.putImageData(od, 0, 0);
      const blob = await new Promise<Blob>((res, rej) => out.toBlob((b) => (b ? res(b) : rej(new Error("cannot encode the mask"))), "image/png"));
      const form = new FormData();
      form.append("image", blob, `clipspace-mask-${Date.now()}.png`);
      form.append("original_ref", JSON.stringify({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "input" }));
      form.append("type", "input");
      form.append("subfolder", "clipspace");
      const res = await this.api.fetchApi("/upload/mask", { method: "POST", body: form });
      if (!res.ok) throw new Error(`${res.status} ${await res.text()}`);
      const r = await res.json();
      onSaved({ value: `${r.subfolder ? `${r.subfolder}/` : ""}${r.name} [input]` });
      this.close();
      toast("Mask saved", "success", { timeout: 1500 });
    };
    const saveBtn = h("button", {
      class: "btn btn-primary mask-save",
      onclick: () => save().catch((e) => toast(`Mask not saved: ${e instanceof Error ? e.message : e}`, "error")),
    }, icon("save"), "Save");
    this.box = h("div", { class: "mask-editor", role: "dialog", "aria-label": "Mask editor" },
      h("div", { class: "mask-toolbar" },
        h("span", { class: "mask-title" }, `Mask · ${ref.filename}`),
        toolBtn("paint", "Paint"), toolBtn("erase", "Erase"),
        h("label", { class: "mask-size-label" }, "Brush", size, sizeText),
        h("button", { class: "btn btn-sm", onclick: () => mctx.clearRect(0, 0, w, hgt) }, "Clear"),
        h("span", { class: "spacer" }),
        h("span", { class: "setting-help" }, "Left button paints, right button erases"),
        h("button", { class: "btn", onclick: () => this.close() }, "Cancel"),
        saveBtn),
      stage);
    document.body.append(this.box);
    this.maskCanvas = mask;
    this.box.dataset.ready = "1";
  }
}
