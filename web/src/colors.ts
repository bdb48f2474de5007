// One colour per socket type, used for slots and links. Well-known types get fixed colours so a
// user learns them once; any other type gets a stable colour derived from its name.
import { LGraphCanvas } from "@comfyorg/litegraph";

const KNOWN: Record<string, string> = {
  MODEL: "#b39ddb",
  CLIP: "#ffd54f",
  VAE: "#ef5350",
  CONDITIONING: "#ffa931",
  LATENT: "#ff9cf9",
  IMAGE: "#64b5f6",
  MASK: "#81c784",
  CONTROL_NET: "#00d78d",
  UPSCALE_MODEL: "#4db6ac",
  CLIP_VISION: "#a8dadc",
  CLIP_VISION_OUTPUT: "#ad7452",
  STYLE_MODEL: "#c2ffae",
  INT: "#9ccc65",
  FLOAT: "#aed581",
  STRING: "#90a4ae",
  BOOLEAN: "#7986cb",
  COMBO: "#a1887f",
  "*": "#cfd8dc",
};

function hashHue(name: string): number {
  let h = 2166136261;
  for (let i = 0; i < name.length; i++) {
    h ^= name.charCodeAt(i);
    h = Math.imul(h, 16777619);
  }
  return (h >>> 0) % 360;
}

const cache = new Map<string, string>();

export function typeColor(type: string): string {
  let c = cache.get(type);
  if (!c) {
    c = KNOWN[type] ?? `hsl(${hashHue(type)}, 65%, 65%)`;
    cache.set(type, c);
  }
  return c;
}

/** Registers the colour of every type with litegraph (links) and the canvas (slots). */
export function applyTypeColors(canvas: LGraphCanvas, types: Iterable<string>): void {
  for (const t of types) {
    const c = typeColor(t);
    LGraphCanvas.link_type_colors[t] = c;
    canvas.default_connection_color_byType[t] = c;
    canvas.default_connection_color_byTypeOff[t] = c;
  }
}
