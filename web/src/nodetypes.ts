// Turns every /object_info entry into a litegraph node class, plus the editor-only virtual nodes
// that ComfyUI workflows contain (Reroute, Note), which never reach the server.
import {
  LGraphBadge,
  LGraphNode,
  LiteGraph,
  RenderShape,
  type INodeInputSlot,
} from "@comfyorg/litegraph";
import type { ISerialisedNode } from "./lgtypes";
import { addTextAreaWidget, isTextAreaWidget, removeDomWidgets } from "./domwidgets";
import { drawNodeImages, drawNodeOverlay, installStrokeStyles, setIssues, visual } from "./nodevisuals";
import { displayName, nodeInputs, nodeOutputs, type NodeDef, type ObjectInfo } from "./schema";
import { CONTROL_WIDGET_NAME, addInputWidget, extras, normaliseControlValue } from "./widgets";

export interface SdNode extends LGraphNode {
  comfyClass: string;
}

export interface NodeHooks {
  /** A node was configured from saved data or its widget changed: e.g. LoadImage shows its file. */
  nodeValueChanged(node: LGraphNode, widgetName?: string): void;
}

let hooks: NodeHooks | null = null;
export function setNodeHooks(h: NodeHooks): void {
  hooks = h;
}

/** The definitions currently registered, by class name. */
export const registry = new Map<string, NodeDef>();

const ID_BADGE_COLOR = "#2b303b";

function addIdBadge(node: LGraphNode): void {
  node.badges.push(() => new LGraphBadge({ text: `#${node.id}`, fgColor: "#9aa3b2", bgColor: ID_BADGE_COLOR }));
}

function buildNode(node: LGraphNode, def: NodeDef): void {
  const inputs = nodeInputs(def);
  // Sockets first, then one input per widget, which is how ComfyUI lays out `inputs`.
  for (const input of inputs) {
    if (input.widget) continue;
    const slot = node.addInput(input.name, input.type, input.tooltip ? { tooltip: input.tooltip } as any : undefined);
    if (input.optional) slot.shape = RenderShape.HollowCircle as unknown as RenderShape;
  }
  for (const input of inputs) {
    if (!input.widget) continue;
    addInputWidget(node, input);
    node.addInput(input.name, input.type, { widget: { name: input.name } } as Partial<INodeInputSlot>);
  }
  for (const out of nodeOutputs(def)) {
    const slot = node.addOutput(out.name, out.type, out.tooltip ? { tooltip: out.tooltip } as any : undefined);
    if (out.isList) slot.shape = RenderShape.GRID;
  }
}

/** After loading a workflow: add widget inputs an older workflow lacks, fix legacy control values. */
function normaliseConfigured(node: LGraphNode): void {
  for (const w of node.widgets ?? []) {
    if (w.name === CONTROL_WIDGET_NAME && extras(w).sdTarget) w.value = normaliseControlValue(w.value);
    const input = extras(w).sdInput;
    if (input && !node.inputs.some((i) => i.name === input.name)) {
      node.addInput(input.name, input.type, { widget: { name: input.name } } as Partial<INodeInputSlot>);
    }
  }
  for (const input of node.inputs) {
    if (input.widget && !node.widgets?.some((w) => w.name === input.widget!.name) && input.link == null) {
      // A widget input of an older schema with no widget any more: drop the dangling socket.
      node.removeInput(node.inputs.indexOf(input));
    }
  }
}

export function registerNodeDefs(defs: ObjectInfo): void {
  for (const def of Object.values(defs)) {
    if (!def || typeof def !== "object" || !def.name) continue;
    registry.set(def.name, def);
    const title = displayName(def);
    class Node extends LGraphNode {
      static override title = title;
      static comfyClass = def.name;
      static nodeData = def;
      comfyClass = def.name;

      constructor(t?: string) {
        super(t ?? title, def.name);
        this.serialize_widgets = true;
        this.properties["Node name for S&R"] = def.name;
        buildNode(this, def);
        installStrokeStyles(this);
        addIdBadge(this);
        const size = this.computeSize();
        size[0] = Math.max(size[0], this.widgets?.length ? 280 : 210, def.output_node && !def.output.length ? 260 : 0);
        if (def.output_node && /image/i.test(def.name + (def.category ?? ""))) size[1] = Math.max(size[1], 260);
        if (this.widgets?.some(isTextAreaWidget)) {
          size[0] = Math.max(size[0], 400);
          size[1] = Math.max(size[1], 200);
        }
        this.setSize(size);
      }

      override onConfigure(_info: ISerialisedNode): void {
        normaliseConfigured(this);
        hooks?.nodeValueChanged(this);
      }

      override onRemoved(): void {
        removeDomWidgets(this);
      }

      override onDrawBackground(ctx: CanvasRenderingContext2D): void {
        drawNodeImages(this, ctx);
      }

      override onDrawForeground(ctx: CanvasRenderingContext2D): void {
        drawNodeOverlay(this, ctx);
      }

      override onWidgetChanged(name: string): void {
        clearIssue(this, name);
        hooks?.nodeValueChanged(this, name);
      }

      override onConnectionsChange(_type: unknown, index: number): void {
        const input = this.inputs?.[index];
        if (input) clearIssue(this, input.name);
      }
    }
    Object.defineProperty(Node, "name", { value: `${def.name}Node` });
    LiteGraph.registerNodeType(def.name, Node);
    // registerNodeType derives a category from the type path; use the server's category instead.
    (Node as any).category = def.category ?? "";
  }
}

function clearIssue(node: LGraphNode, inputName: string): void {
  const v = visual(node);
  if (!v.issues?.length) return;
  const rest = v.issues.filter((i) => i.input !== inputName);
  if (rest.length !== v.issues.length) setIssues(node, rest);
}

// ---- virtual nodes ----

/** ComfyUI's legacy Reroute node: a pass-through dot; the link is followed when converting. */
class RerouteNode extends LGraphNode {
  static override title = "Reroute";
  isVirtualNode = true;

  constructor(title?: string) {
    super(title ?? "Reroute", "Reroute");
    this.addInput("", "*");
    this.addOutput("", "*");
    this.size = [75, 26];
    this.serialize_widgets = true;
    this.properties.showOutputText = false;
    this.properties.horizontal = false;
  }

  override onConnectionsChange(): void {
    // The output takes the type of whatever feeds the input, so further links are type-checked.
    const link = this.graph?.getLink(this.inputs[0]?.link ?? undefined);
    const type = link?.type && link.type !== "*" ? String(link.type) : "*";
    if (this.outputs[0]) this.outputs[0].type = type;
  }
}
(RerouteNode as any).title_mode = LiteGraph.NO_TITLE;

/** A free-text sticky note. */
class NoteNode extends LGraphNode {
  static override title = "Note";
  isVirtualNode = true;

  constructor(title?: string) {
    super(title ?? "Note", "Note");
    this.serialize_widgets = true;
    this.color = "#432";
    this.bgcolor = "#653";
    addTextAreaWidget(this, "text", "");
    this.size = [320, 140];
  }

  override onRemoved(): void {
    removeDomWidgets(this);
  }
}

export function registerVirtualNodes(): void {
  LiteGraph.registerNodeType("Reroute", RerouteNode);
  (RerouteNode as any).category = "utils";
  LiteGraph.registerNodeType("Note", NoteNode);
  (NoteNode as any).category = "utils";
}

export const VIRTUAL_TYPES = new Set(["Reroute", "Note", "MarkdownNote", "PrimitiveNode"]);

export function isVirtual(node: LGraphNode): boolean {
  return !!(node as any).isVirtualNode || VIRTUAL_TYPES.has(node.type);
}

export function comfyClassOf(node: LGraphNode): string {
  return (node as SdNode).comfyClass ?? node.type;
}
