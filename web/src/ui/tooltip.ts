// Hover tooltips on the canvas: node descriptions on titles, input/output/widget tooltips on slots.
import type { LGraphCanvas } from "@comfyorg/litegraph";
import { registry } from "../nodetypes";
import { h } from "./dom";

export function installTooltips(canvas: LGraphCanvas, el: HTMLCanvasElement): void {
  const tip = h("div", { class: "tooltip", role: "tooltip" });
  document.body.append(tip);
  let timer = 0;
  const hide = () => {
    window.clearTimeout(timer);
    tip.classList.remove("show");
  };
  el.addEventListener("pointerdown", hide);
  el.addEventListener("pointerleave", hide);
  el.addEventListener("wheel", hide, { passive: true });
  el.addEventListener("pointermove", (e) => {
    hide();
    if (e.buttons) return;
    timer = window.setTimeout(() => {
      const text = textAt(canvas);
      if (!text) return;
      tip.textContent = text;
      tip.style.left = `${Math.min(e.clientX + 14, window.innerWidth - 340)}px`;
      tip.style.top = `${e.clientY + 18}px`;
      tip.classList.add("show");
    }, 550);
  });
}

function textAt(canvas: LGraphCanvas): string | undefined {
  const graph = canvas.graph;
  if (!graph) return;
  const [x, y] = canvas.graph_mouse;
  const node = graph.getNodeOnPos(x, y);
  if (!node) return;
  const def = registry.get((node as any).comfyClass ?? node.type);
  if (y < node.pos[1]) return def?.description || undefined;
  const input = node.getInputOnPos?.([x, y]);
  if (input) return (input as any).tooltip ?? def?.input?.required?.[input.name]?.[1]?.tooltip ?? def?.input?.optional?.[input.name]?.[1]?.tooltip;
  const output = node.getOutputOnPos?.([x, y]);
  if (output) return (output as any).tooltip;
  const widget = node.getWidgetOnPos(x, y, true);
  if (widget?.tooltip) return widget.tooltip;
  return undefined;
}
