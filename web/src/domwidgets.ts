// Multi-line text widgets as real <textarea> elements laid over the canvas, so prompts get native
// editing (selection, undo, IME, scrolling). Each frame the canvas draws the widget's slot; the
// element is moved there, and elements of nodes that were not drawn are hidden.
import type { LGraphCanvas, LGraphNode } from "@comfyorg/litegraph";
import type { IBaseWidget } from "./lgtypes";

export interface TextAreaWidget extends IBaseWidget {
  element: HTMLTextAreaElement;
  /** canvas.frame number of the last frame that drew this widget. */
  drawnFrame: number;
}

const MIN_HEIGHT = 64;
const live = new Set<TextAreaWidget>();
let overlay: HTMLElement | null = null;
let canvasRef: LGraphCanvas | null = null;

/** Hidden below this zoom: the text would be unreadable and the element would cover the graph. */
const MIN_SCALE = 0.45;

export function initDomWidgets(canvas: LGraphCanvas, root: HTMLElement): void {
  canvasRef = canvas;
  overlay = root;
}

export function addTextAreaWidget(node: LGraphNode, name: string, value: string, opts: { placeholder?: string; onChange?: () => void } = {}): TextAreaWidget {
  const el = document.createElement("textarea");
  el.className = "sdflow-textarea";
  el.spellcheck = false;
  el.value = value;
  el.placeholder = opts.placeholder ?? name;
  el.dataset.widget = name;
  el.style.display = "none";
  overlay?.appendChild(el);

  const widget = {
    type: "customtext",
    name,
    options: { multiline: true },
    y: 0,
    element: el,
    drawnFrame: -1,
    get value(): string {
      return el.value;
    },
    set value(v: unknown) {
      el.value = v == null ? "" : String(v);
    },
    computeLayoutSize() {
      return { minHeight: MIN_HEIGHT, minWidth: 220 };
    },
    draw(ctx: CanvasRenderingContext2D, drawNode: LGraphNode, width: number, y: number) {
      widget.drawnFrame = canvasRef?.frame ?? 0;
      const h = (widget as any).computedHeight ?? MIN_HEIGHT;
      // Backdrop so the node still reads correctly at low zoom, where the element is hidden.
      ctx.save();
      ctx.fillStyle = "#15171c";
      ctx.beginPath();
      ctx.roundRect(10, y, width - 20, h - 6, 6);
      ctx.fill();
      ctx.restore();
      place(widget, drawNode, width, y, h);
    },
  } as unknown as TextAreaWidget;

  el.addEventListener("input", () => {
    if (node.graph) node.graph._version++;
    opts.onChange?.();
  });
  // Keys typed into the textarea must not reach the canvas (Delete would remove the node).
  el.addEventListener("keydown", (e) => e.stopPropagation());
  el.addEventListener("pointerdown", (e) => e.stopPropagation());
  el.addEventListener("wheel", (e) => {
    // Scroll the text when it overflows, otherwise let the canvas zoom.
    if (el.scrollHeight <= el.clientHeight) {
      e.preventDefault();
      canvasRef?.canvas.dispatchEvent(new WheelEvent(e.type, e));
    }
  }, { passive: false });

  live.add(widget);
  node.addCustomWidget(widget as unknown as IBaseWidget);
  return widget;
}

function place(widget: TextAreaWidget, node: LGraphNode, width: number, y: number, h: number): void {
  const canvas = canvasRef;
  if (!canvas) return;
  const el = widget.element;
  const { scale, offset } = canvas.ds;
  if (scale < MIN_SCALE || node.flags?.collapsed) {
    el.style.display = "none";
    return;
  }
  const [dx, dy] = overlayOffset(canvas);
  const left = dx + (node.pos[0] + 10 + offset[0]) * scale;
  const top = dy + (node.pos[1] + y + offset[1]) * scale;
  // Only touch styles that changed: writes invalidate layout, and this runs every frame.
  setStyle(el, "display", "");
  setStyle(el, "transform", `translate(${left.toFixed(1)}px, ${top.toFixed(1)}px) scale(${scale})`);
  setStyle(el, "width", `${Math.round(width - 20)}px`);
  setStyle(el, "height", `${Math.round(Math.max(16, h - 6))}px`);
  const disabled = !!(node as any).getSlotFromWidget?.(widget)?.link;
  if (el.disabled !== disabled) el.disabled = disabled;
}

function setStyle(el: HTMLElement, prop: "display" | "transform" | "width" | "height", value: string): void {
  if (el.style[prop] !== value) el.style[prop] = value;
}

let offsetFrame = -1;
let cachedOffset: [number, number] = [0, 0];

/** Canvas position inside the overlay, measured once per frame (reading layout is costly). */
function overlayOffset(canvas: LGraphCanvas): [number, number] {
  if (offsetFrame !== canvas.frame) {
    offsetFrame = canvas.frame;
    const rect = canvas.canvas.getBoundingClientRect();
    const o = overlay!.getBoundingClientRect();
    cachedOffset = [rect.left - o.left, rect.top - o.top];
  }
  return cachedOffset;
}

/** Called after each frame: hides textareas whose node was culled, removed or collapsed. */
export function syncDomWidgets(): void {
  const frame = canvasRef?.frame ?? 0;
  for (const w of live) {
    if (!w.element.isConnected) {
      live.delete(w);
      continue;
    }
    if (w.drawnFrame !== frame && w.element.style.display !== "none") w.element.style.display = "none";
  }
}

export function removeDomWidgets(node: LGraphNode): void {
  for (const w of node.widgets ?? []) {
    const tw = w as unknown as TextAreaWidget;
    if (tw.element && live.has(tw)) {
      tw.element.remove();
      live.delete(tw);
    }
  }
}

export function isTextAreaWidget(w: IBaseWidget): w is TextAreaWidget {
  return (w as TextAreaWidget).element instanceof HTMLTextAreaElement;
}
