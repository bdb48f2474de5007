// The minimap: every node as a block and the visible area as a frame, in a corner of the canvas.
// Clicking or dragging on it moves the view there. It redraws only when the graph or the view moved.
import type { LGraph, LGraphCanvas } from "@comfyorg/litegraph";
import { h } from "./ui/dom";

const W = 220;
const H = 150;

export class Minimap {
  readonly el: HTMLCanvasElement;
  private key = "";
  private bounds: [number, number, number] = [0, 0, 1]; // x0, y0, scale

  constructor(private canvas: LGraphCanvas, private graph: () => LGraph) {
    const dpr = window.devicePixelRatio || 1;
    this.el = h("canvas", { class: "minimap", width: W * dpr, height: H * dpr, title: "Minimap: click or drag to move the view" });
    this.el.style.width = `${W}px`;
    this.el.style.height = `${H}px`;
    const go = (e: PointerEvent) => {
      const r = this.el.getBoundingClientRect();
      const [x0, y0, s] = this.bounds;
      const gx = x0 + (e.clientX - r.left) / s;
      const gy = y0 + (e.clientY - r.top) / s;
      const ds = this.canvas.ds;
      const cw = this.canvas.canvas.getBoundingClientRect();
      ds.offset[0] = cw.width / ds.scale / 2 - gx;
      ds.offset[1] = cw.height / ds.scale / 2 - gy;
      this.canvas.setDirty(true, true);
    };
    this.el.addEventListener("pointerdown", (e) => {
      e.stopPropagation();
      this.el.setPointerCapture(e.pointerId);
      go(e);
      const move = (ev: PointerEvent) => go(ev);
      const up = () => {
        this.el.removeEventListener("pointermove", move);
        this.el.removeEventListener("pointerup", up);
      };
      this.el.addEventListener("pointermove", move);
      this.el.addEventListener("pointerup", up);
    });
  }

  set visible(v: boolean) {
    this.el.hidden = !v;
    this.key = "";
    if (v) this.draw();
  }

  get visible(): boolean {
    return !this.el.hidden;
  }

  /** Called after every canvas frame; cheap unless something moved. */
  update(): void {
    if (this.el.hidden) return;
    const g = this.graph();
    const ds = this.canvas.ds;
    let sum = 0;
    for (const n of g.nodes) sum += n.pos[0] * 3 + n.pos[1] * 7 + n.size[0] + n.size[1];
    const key = `${g.nodes.length}|${sum}|${ds.offset[0]}|${ds.offset[1]}|${ds.scale}|${g.groups.length}`;
    if (key === this.key) return;
    this.key = key;
    this.draw();
  }

  private draw(): void {
    const ctx = this.el.getContext("2d");
    if (!ctx) return;
    const dpr = this.el.width / W;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, W, H);
    ctx.fillStyle = "rgba(20,22,27,0.88)";
    ctx.fillRect(0, 0, W, H);
    const g = this.graph();
    const ds = this.canvas.ds;
    const cw = this.canvas.canvas.getBoundingClientRect();
    const view = [-ds.offset[0], -ds.offset[1], cw.width / ds.scale, cw.height / ds.scale];
    let x0 = view[0], y0 = view[1], x1 = view[0] + view[2], y1 = view[1] + view[3];
    for (const n of g.nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - 30);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const pad = 6;
    const s = Math.min((W - 2 * pad) / (x1 - x0 || 1), (H - 2 * pad) / (y1 - y0 || 1));
    const ox = pad + (W - 2 * pad - (x1 - x0) * s) / 2;
    const oy = pad + (H - 2 * pad - (y1 - y0) * s) / 2;
    this.bounds = [x0 - ox / s, y0 - oy / s, s];
    const tx = (x: number) => ox + (x - x0) * s;
    const ty = (y: number) => oy + (y - y0) * s;
    for (const gr of g.groups) {
      ctx.fillStyle = `${gr.color ?? "#3f789e"}55`;
      ctx.fillRect(tx(gr.pos[0]), ty(gr.pos[1]), gr.size[0] * s, gr.size[1] * s);
    }
    for (const n of g.nodes) {
      ctx.fillStyle = n.mode === 2 ? "#2a2d35" : n.mode === 4 ? "#5b3f80" : "#5d6677";
      ctx.fillRect(tx(n.pos[0]), ty(n.pos[1] - 30), Math.max(1, n.size[0] * s), Math.max(1, (n.size[1] + 30) * s));
    }
    ctx.strokeStyle = "#8fb4ff";
    ctx.lineWidth = 1;
    ctx.strokeRect(tx(view[0]) + 0.5, ty(view[1]) + 0.5, view[2] * s, view[3] * s);
  }
}
