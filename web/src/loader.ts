// Building graphs: from an API-format prompt (nodes placed by dependency depth), and the default
// text-to-image graph, both from the registered node types only.
import { LiteGraph, type LGraph, type LGraphNode } from "@comfyorg/litegraph";
import type { ApiPrompt } from "./convert";
import { registry } from "./nodetypes";

function isLink(v: unknown): v is [string, number] {
  return Array.isArray(v) && v.length === 2 && typeof v[0] === "string" && typeof v[1] === "number";
}

function setWidget(node: LGraphNode, name: string, value: unknown): boolean {
  const w = node.widgets?.find((x) => x.name === name);
  if (!w) return false;
  if (value && typeof value === "object" && "__value__" in (value as any)) value = (value as any).__value__;
  w.value = value as any;
  return true;
}

/** Rebuilds the graph from an API prompt. Returns the class types the server does not know. */
export function loadApiPrompt(graph: LGraph, prompt: ApiPrompt): string[] {
  graph.clear();
  const missing = new Set<string>();
  const created = new Map<string, LGraphNode>();
  const ids = Object.keys(prompt).sort((a, b) => Number(a) - Number(b) || a.localeCompare(b));
  for (const id of ids) {
    const spec = prompt[id];
    const node = LiteGraph.createNode(spec.class_type);
    if (!node) {
      missing.add(spec.class_type);
      continue;
    }
    const numeric = Number(id);
    if (Number.isInteger(numeric) && numeric > 0 && !graph.getNodeById(numeric)) node.id = numeric;
    if (spec._meta?.title) node.title = spec._meta.title;
    graph.add(node);
    created.set(id, node);
  }
  for (const id of ids) {
    const node = created.get(id);
    if (!node) continue;
    for (const [name, value] of Object.entries(prompt[id].inputs ?? {})) {
      if (isLink(value)) {
        const src = created.get(value[0]);
        const slot = node.inputs.findIndex((i) => i.name === name);
        if (src && slot >= 0) src.connect(value[1], node, slot);
      } else {
        setWidget(node, name, value);
      }
    }
    // Keep the values as loaded: a prompt records exactly what ran.
    for (const w of node.widgets ?? []) if (w.name === "control_after_generate") w.value = "fixed";
  }
  layoutByDepth(graph, [...created.values()]);
  return [...missing];
}

/** Places nodes in columns by their longest distance from a source. */
export function layoutByDepth(graph: LGraph, nodes: LGraphNode[]): void {
  const depth = new Map<LGraphNode, number>();
  const visit = (n: LGraphNode, stack: Set<LGraphNode>): number => {
    const known = depth.get(n);
    if (known !== undefined) return known;
    if (stack.has(n)) return 0;
    stack.add(n);
    let d = 0;
    for (const input of n.inputs ?? []) {
      if (input.link == null) continue;
      const link = graph.getLink(input.link);
      const src = link ? graph.getNodeById(link.origin_id) : null;
      if (src) d = Math.max(d, visit(src, stack) + 1);
    }
    stack.delete(n);
    depth.set(n, d);
    return d;
  };
  for (const n of nodes) visit(n, new Set());
  const columns = new Map<number, LGraphNode[]>();
  for (const n of nodes) {
    const d = depth.get(n) ?? 0;
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d)!.push(n);
  }
  let x = 40;
  for (const d of [...columns.keys()].sort((a, b) => a - b)) {
    const col = columns.get(d)!;
    let y = 60;
    let width = 0;
    for (const n of col) {
      n.pos = [x, y];
      y += n.size[1] + 70;
      width = Math.max(width, n.size[0]);
    }
    x += width + 70;
  }
}

const POSITIVE = "a beautiful mountain landscape at sunrise, golden light, highly detailed";
const NEGATIVE = "blurry, low quality, watermark, text";

/** The txt2img graph ComfyUI users start from. Returns the node types the server lacks. */
export function buildDefaultGraph(graph: LGraph): string[] {
  graph.clear();
  const need = ["CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"];
  const missing = need.filter((t) => !registry.has(t));
  const make = (type: string, pos: [number, number]): LGraphNode | null => {
    const n = LiteGraph.createNode(type);
    if (!n) return null;
    n.pos = pos;
    graph.add(n);
    return n;
  };
  const ckpt = make("CheckpointLoaderSimple", [30, 250]);
  const pos = make("CLIPTextEncode", [380, 40]);
  const neg = make("CLIPTextEncode", [380, 320]);
  const latent = make("EmptyLatentImage", [440, 600]);
  const sampler = make("KSampler", [860, 120]);
  const decode = make("VAEDecode", [1210, 120]);
  const save = make("SaveImage", [1470, 120]);
  if (pos) {
    pos.title = "Positive prompt";
    setWidget(pos, "text", POSITIVE);
  }
  if (neg) {
    neg.title = "Negative prompt";
    setWidget(neg, "text", NEGATIVE);
  }
  const link = (from: LGraphNode | null, type: string, to: LGraphNode | null, input: string) => {
    if (!from || !to) return;
    const out = from.outputs.findIndex((o) => o.type === type);
    const slot = to.inputs.findIndex((i) => i.name === input);
    if (out >= 0 && slot >= 0) from.connect(out, to, slot);
  };
  link(ckpt, "MODEL", sampler, "model");
  link(ckpt, "CLIP", pos, "clip");
  link(ckpt, "CLIP", neg, "clip");
  link(pos, "CONDITIONING", sampler, "positive");
  link(neg, "CONDITIONING", sampler, "negative");
  link(latent, "LATENT", sampler, "latent_image");
  link(sampler, "LATENT", decode, "samples");
  link(ckpt, "VAE", decode, "vae");
  link(decode, "IMAGE", save, "images");
  return missing;
}
