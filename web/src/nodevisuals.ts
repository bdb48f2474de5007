// What the canvas shows on a node beyond litegraph's own drawing: the running outline, a progress
// bar, sampler previews and output images, and validation / execution errors.
import { LiteGraph, type LGraphNode } from "@comfyorg/litegraph";
import type { IBaseWidget } from "./lgtypes";

export interface NodeIssue {
  message: string;
  details?: string;
  /** Input (socket or widget) the problem is about. */
  input?: string;
}

export interface NodeVisual {
  running?: boolean;
  progress?: number;
  cached?: boolean;
  /** Output or preview images, drawn below the widgets. */
  images?: HTMLImageElement[];
  /** The latest sampler preview; replaced by outputs when they arrive. */
  preview?: HTMLImageElement;
  issues?: NodeIssue[];
}

const visuals = new WeakMap<LGraphNode, NodeVisual>();

export function visual(node: LGraphNode): NodeVisual {
  let v = visuals.get(node);
  if (!v) visuals.set(node, (v = {}));
  return v;
}

export function peekVisual(node: LGraphNode): NodeVisual | undefined {
  return visuals.get(node);
}

const ACCENT = "#4cc38a";
const ERROR = "#ff4d4f";

/** Adds the running outline to litegraph's per-node stroke styles. */
export function installStrokeStyles(node: LGraphNode): void {
  node.strokeStyles.running = function (this: LGraphNode) {
    if (visuals.get(this)?.running) return { color: ACCENT, lineWidth: 3, padding: 6 };
    return undefined;
  };
}

export function setIssues(node: LGraphNode, issues: NodeIssue[] | undefined): void {
  const v = visual(node);
  v.issues = issues?.length ? issues : undefined;
  node.has_errors = !!v.issues;
  const byName = new Set((issues ?? []).map((i) => i.input).filter(Boolean));
  for (const input of node.inputs ?? []) input.hasErrors = byName.has(input.name);
  node.setDirtyCanvas(true, true);
}

function widgetsBottom(node: LGraphNode): number {
  let bottom = 0;
  for (const w of node.widgets ?? []) {
    if (w.hidden) continue;
    const h = w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4;
    bottom = Math.max(bottom, (w.y ?? 0) + h);
  }
  if (!bottom) {
    const rows = Math.max(node.inputs?.filter((i) => !i.widget).length ?? 0, node.outputs?.length ?? 0);
    bottom = rows * LiteGraph.NODE_SLOT_HEIGHT + 6;
  }
  return bottom;
}

const IMAGE_MIN_AREA = 180;

/** Grows the node so an image has room below its widgets. */
export function ensureImageRoom(node: LGraphNode): void {
  const need = widgetsBottom(node) + IMAGE_MIN_AREA;
  if (node.size[1] < need) node.setSize([Math.max(node.size[0], 240), need]);
}

/** Draws images in the free area below the widgets (called from onDrawBackground). */
export function drawNodeImages(node: LGraphNode, ctx: CanvasRenderingContext2D): void {
  const v = visuals.get(node);
  if (!v || node.flags?.collapsed) return;
  const imgs = v.images?.length ? v.images : v.preview ? [v.preview] : [];
  const ready = imgs.filter((i) => i.complete && i.naturalWidth > 0);
  if (!ready.length) return;
  const top = widgetsBottom(node) + 4;
  const w = node.size[0] - 12;
  const h = node.size[1] - top - 22;
  if (h < 16 || w < 16) return;
  // Batch outputs are laid out in a grid of roughly square cells.
  const n = ready.length;
  const cols = Math.ceil(Math.sqrt(n));
  const rows = Math.ceil(n / cols);
  const cw = w / cols;
  const ch = h / rows;
  for (let i = 0; i < n; i++) {
    const img = ready[i];
    const s = Math.min(cw / img.naturalWidth, ch / img.naturalHeight);
    const dw = img.naturalWidth * s;
    const dh = img.naturalHeight * s;
    const x = 6 + (i % cols) * cw + (cw - dw) / 2;
    const y = top + Math.floor(i / cols) * ch + (ch - dh) / 2;
    ctx.drawImage(img, x, y, dw, dh);
  }
  ctx.save();
  ctx.fillStyle = "#8b93a1";
  ctx.font = "11px Inter, system-ui, sans-serif";
  ctx.textAlign = "center";
  const first = ready[0];
  const label = `${first.naturalWidth} × ${first.naturalHeight}${n > 1 ? `  (${n} images)` : ""}${v.images?.length ? "" : "  preview"}`;
  ctx.fillText(label, node.size[0] / 2, node.size[1] - 7);
  ctx.restore();
}

function widgetByName(node: LGraphNode, name: string): IBaseWidget | undefined {
  return node.widgets?.find((w) => w.name === name);
}

/** Progress bar, widget error outlines and error text (called from onDrawForeground). */
export function drawNodeOverlay(node: LGraphNode, ctx: CanvasRenderingContext2D): void {
  const v = visuals.get(node);
  if (!v) return;
  if (v.progress !== undefined && v.running && !node.flags?.collapsed) {
    ctx.save();
    ctx.fillStyle = "rgba(255,255,255,0.08)";
    ctx.fillRect(0, -3, node.size[0], 3);
    ctx.fillStyle = ACCENT;
    ctx.fillRect(0, -3, node.size[0] * Math.max(0, Math.min(1, v.progress)), 3);
    ctx.restore();
  }
  if (!v.issues?.length) return;
  ctx.save();
  if (!node.flags?.collapsed) {
    for (const issue of v.issues) {
      if (!issue.input) continue;
      const w = widgetByName(node, issue.input);
      if (w && w.y !== undefined) {
        const h = (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4) - 4;
        ctx.strokeStyle = ERROR;
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.roundRect(12, w.y - 1, node.size[0] - 24, h + 2, 6);
        ctx.stroke();
      }
    }
  }
  // Messages under the node, where they do not hide the widgets they are about.
  ctx.font = "12px Inter, system-ui, sans-serif";
  ctx.textAlign = "left";
  const lines: string[] = [];
  for (const issue of v.issues.slice(0, 6)) {
    const head = issue.input ? `${issue.input}: ` : "";
    lines.push(`${head}${issue.message}${issue.details ? ` — ${issue.details}` : ""}`);
  }
  const maxW = Math.max(node.size[0], 260);
  const wrapped: string[] = [];
  for (const line of lines) {
    let cur = "";
    for (const word of line.split(/\s+/)) {
      const next = cur ? `${cur} ${word}` : word;
      if (ctx.measureText(next).width > maxW - 16 && cur) {
        wrapped.push(cur);
        cur = word;
      } else cur = next;
    }
    if (cur) wrapped.push(cur);
  }
  const y0 = (node.flags?.collapsed ? 0 : node.size[1]) + 8;
  const boxH = wrapped.length * 16 + 8;
  ctx.fillStyle = "rgba(60, 12, 14, 0.92)";
  ctx.beginPath();
  ctx.roundRect(0, y0, maxW, boxH, 6);
  ctx.fill();
  ctx.strokeStyle = ERROR;
  ctx.lineWidth = 1;
  ctx.stroke();
  ctx.fillStyle = "#ffd6d6";
  wrapped.forEach((l, i) => ctx.fillText(l, 8, y0 + 18 + i * 16));
  ctx.restore();
}

export function clearRunState(node: LGraphNode): void {
  const v = visuals.get(node);
  if (!v) return;
  v.running = false;
  v.progress = undefined;
  v.cached = false;
}

/** Below this zoom a node is drawn as a box: its text is unreadable there, and litegraph's full
 * drawing (slots, widgets, title text) of hundreds of nodes costs ~35 us each, which drops a
 * whole-graph view of 500 nodes below 60 fps (bench/editor_frames.py, zoom 0.12: 12 ms a frame
 * drawn in full, 3.5 ms as boxes). */
export const BOX_ZOOM = 0.2;

/** The box view of a node: body, title bar, and the outlines that carry state (selected, running,
 * error), in the node's colours; muted nodes faded and bypassed ones purple, as in the full view. */
export function drawNodeBox(canvas: { selected_nodes: Record<string, LGraphNode> }, node: LGraphNode, ctx: CanvasRenderingContext2D): void {
  const title = LiteGraph.NODE_TITLE_HEIGHT;
  const collapsed = !!node.flags?.collapsed;
  const w = collapsed ? Math.max(node._collapsed_width ?? 0, title * 2) : node.size[0];
  const h = collapsed ? 0 : node.size[1];
  const alpha = ctx.globalAlpha;
  if (node.mode === 2) ctx.globalAlpha = alpha * 0.4;
  ctx.fillStyle = node.mode === 4 ? "#5b3f80" : (node.bgcolor ?? LiteGraph.NODE_DEFAULT_BGCOLOR);
  ctx.fillRect(0, 0, w, h);
  ctx.fillStyle = node.color ?? LiteGraph.NODE_DEFAULT_COLOR;
  ctx.fillRect(0, -title, w, title);
  const v = visuals.get(node);
  const outline = v?.issues ? ERROR : v?.running ? ACCENT : canvas.selected_nodes[node.id] ? "#ffffff" : null;
  if (outline) {
    ctx.strokeStyle = outline;
    ctx.lineWidth = 6;
    ctx.strokeRect(-3, -title - 3, w + 6, h + title + 6);
  }
  ctx.globalAlpha = alpha;
}
