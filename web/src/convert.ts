// UI graph → API prompt, with the same rules as ComfyUI's graphToPrompt: widget values by name,
// links as [String(origin id), slot], muted nodes (mode 2) left out, bypassed nodes (mode 4)
// bridged by type, Reroute nodes followed, array values wrapped as {"__value__": [...]}.
import { LGraphEventMode, type LGraph, type LGraphNode } from "@comfyorg/litegraph";
import type { ISerialisedGraph } from "./lgtypes";
import { comfyClassOf, isVirtual } from "./nodetypes";

export type ApiLink = [string, number];
export interface ApiNode {
  inputs: Record<string, unknown>;
  class_type: string;
  _meta?: { title: string };
}
export type ApiPrompt = Record<string, ApiNode>;

const MUTED = LGraphEventMode.NEVER; // 2
const BYPASS = LGraphEventMode.BYPASS; // 4

type Resolved = { link: ApiLink } | { value: unknown } | null;

function sameType(a: unknown, b: unknown): boolean {
  if (a == null || b == null) return false;
  const sa = String(a);
  const sb = String(b);
  return sa === sb || sa === "*" || sb === "*";
}

/** Follows a node input's link upstream through reroutes and bypassed nodes. */
export function resolveInput(graph: LGraph, node: LGraphNode, slot: number): Resolved {
  let linkId = node.inputs[slot]?.link ?? null;
  const seen = new Set<number | string>();
  while (linkId != null) {
    if (seen.has(linkId)) return null; // a cycle through virtual nodes
    seen.add(linkId);
    const link = graph.getLink(linkId);
    if (!link) return null;
    const origin = graph.getNodeById(link.origin_id);
    if (!origin) return null;
    if (origin.type === "Reroute") {
      linkId = origin.inputs[0]?.link ?? null;
      continue;
    }
    if (origin.mode === BYPASS) {
      // Pass through the bypassed node: prefer the input at the same index with the matching type,
      // then any input of the matching type.
      const outType = origin.outputs[link.origin_slot]?.type ?? link.type;
      let next: number | null = null;
      const same = origin.inputs[link.origin_slot];
      if (same && same.link != null && sameType(same.type, outType)) next = same.link;
      if (next == null) {
        const match = origin.inputs.find((i) => i.link != null && sameType(i.type, outType) && String(i.type) !== "*");
        next = match?.link ?? null;
      }
      linkId = next;
      continue;
    }
    if (origin.type === "PrimitiveNode") {
      const w = origin.widgets?.[0];
      return w ? { value: w.value } : null;
    }
    return { link: [String(origin.id), link.origin_slot] };
  }
  return null;
}

function serialiseValue(v: unknown): unknown {
  // A literal list would read as a link on the server.
  return Array.isArray(v) ? { __value__: v } : v;
}

/** The API prompt for the current graph (all output nodes). */
export function graphToApi(graph: LGraph): ApiPrompt {
  const output: ApiPrompt = {};
  const nodes = graph.computeExecutionOrder(false) as LGraphNode[];
  for (const node of nodes) {
    if (isVirtual(node) || node.mode === MUTED || node.mode === BYPASS) continue;
    const inputs: Record<string, unknown> = {};
    for (const w of node.widgets ?? []) {
      if (!w.name || (w.options as any)?.serialize === false || w.type === "button") continue;
      const ser = (w as any).serializeValue;
      inputs[w.name] = serialiseValue(typeof ser === "function" ? ser.call(w, node) : w.value);
    }
    node.inputs?.forEach((input, i) => {
      if (input.link == null) return;
      const r = resolveInput(graph, node, i);
      if (!r) {
        // A widget input whose link leads nowhere keeps its widget value; a socket is dropped.
        if (!input.widget) delete inputs[input.name];
        return;
      }
      inputs[input.name] = "link" in r ? r.link : serialiseValue(r.value);
    });
    output[String(node.id)] = {
      inputs,
      class_type: comfyClassOf(node),
      _meta: { title: node.title },
    };
  }
  // Links to nodes that were left out (muted, or virtual with nothing behind them) are removed.
  for (const node of Object.values(output)) {
    for (const [name, v] of Object.entries(node.inputs)) {
      if (Array.isArray(v) && v.length === 2 && typeof v[0] === "string" && !(v[0] in output)) delete node.inputs[name];
    }
  }
  return output;
}

/** The UI workflow that goes with a prompt: litegraph's serialisation, trimmed as ComfyUI does. */
export function serialiseWorkflow(graph: LGraph): ISerialisedGraph {
  const wf = JSON.parse(JSON.stringify(graph.serialize({ sortNodes: true }))) as ISerialisedGraph;
  for (const n of wf.nodes ?? []) {
    for (const slot of [...(n.inputs ?? []), ...(n.outputs ?? [])]) delete (slot as any).localized_name;
  }
  wf.extra = { ...(wf.extra ?? {}), sdflow: { editor: 1 } };
  return wf;
}

export function isApiPrompt(data: unknown): data is ApiPrompt {
  if (!data || typeof data !== "object" || Array.isArray(data)) return false;
  const values = Object.values(data as Record<string, unknown>);
  return values.length > 0 && values.every((v) => !!v && typeof v === "object" && typeof (v as any).class_type === "string");
}
