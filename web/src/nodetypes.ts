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
import { CONTROL_WIDGET_NAME, addInputWidget, alignLegacyWidgetValues, extras, normaliseControlValue } from "./widgets";

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
  // Muted and bypassed nodes say so in words, not only in colour.
  node.badges.push(() => new LGraphBadge({
    text: node.mode === MUTED ? "muted" : node.mode === BYPASS ? "bypassed" : "",
    fgColor: "#f0e6ff",
    bgColor: node.mode === BYPASS ? "#7a3fb0" : "#4a4f5c",
  }));
}

const MUTED = 2;
const BYPASS = 4;

/** Background and title colours that show a node's mode (muted nodes fade, bypassed turn purple). */
function modeColors(node: LGraphNode): { bg?: string; title?: string } {
  if (node.mode === BYPASS) return { bg: "#3a2552", title: "#4b2f6b" };
  if (node.mode === MUTED) return { bg: "#1a1c21", title: "#22252c" };
  return {};
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
        // ComfyUI's width for nodes whose widget labels are long ("control after generate"), so they do not truncate.
        const longLabel = this.widgets?.some((w) => (w.label ?? w.name).length >= 16);
        size[0] = Math.max(size[0], longLabel ? 315 : this.widgets?.length ? 280 : 210, def.output_node && !def.output.length ? 260 : 0);
        if (def.output_node && /image/i.test(def.name + (def.category ?? ""))) size[1] = Math.max(size[1], 260);
        if (this.widgets?.some(isTextAreaWidget)) {
          size[0] = Math.max(size[0], 400);
          size[1] = Math.max(size[1], 200);
        }
        this.setSize(size);
      }

      override get renderingBgColor(): string {
        return modeColors(this).bg ?? super.renderingBgColor;
      }

      override get renderingColor(): string {
        return modeColors(this).title ?? super.renderingColor;
      }

      override changeMode(mode: number): boolean {
        if (mode !== 0 && mode !== MUTED && mode !== BYPASS) return false;
        this.mode = mode;
        if (this.graph) this.graph._version++;
        this.setDirtyCanvas(true, true);
        return true;
      }

      override configure(info: ISerialisedNode): void {
        if (Array.isArray(info.widgets_values) && this.widgets) {
          info = { ...info, widgets_values: alignLegacyWidgetValues(this.widgets, info.widgets_values) as typeof info.widgets_values };
        }
        super.configure(info);
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
  // Editing the node is the fix for a run-time failure too, so its outline goes with the edit.
  const rest = v.issues.filter((i) => i.input !== inputName && !i.message.startsWith("Execution failed"));
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

/**
 * ComfyUI's Primitive node: holds one value and feeds it to the widget inputs it is linked to.
 * Its widget copies the first target widget (type, range, list); the conversion reads its value.
 */
class PrimitiveNode extends LGraphNode {
  static override title = "Primitive";
  isVirtualNode = true;

  constructor(title?: string) {
    super(title ?? "Primitive", "PrimitiveNode");
    this.addOutput("connect to widget input", "*");
    this.serialize_widgets = true;
    this.properties["Run widget replace on values"] = false;
    this.size = [260, 80];
  }

  /** The first widget this node feeds, if any. */
  private targetWidget(): { widget: any; type: string } | null {
    for (const id of this.outputs[0]?.links ?? []) {
      const link = this.graph?.getLink(id);
      const node = link ? this.graph?.getNodeById(link.target_id) : null;
      const input = node?.inputs?.[link!.target_slot];
      const widget = input?.widget ? node?.widgets?.find((w) => w.name === input.widget!.name) : undefined;
      if (widget) return { widget, type: String(input!.type) };
    }
    return null;
  }

  private build(values: unknown[] | undefined): void {
    if (this.widgets?.length) return;
    const target = this.targetWidget();
    const first = values?.length ? values[0] : target?.widget.value;
    if (first === undefined) return;
    const opts = target ? { ...target.widget.options } : {};
    let w;
    if (target?.widget.type === "combo") w = this.addWidget("combo", "value", first as any, () => {}, { values: opts.values ?? [first] });
    else if (typeof first === "number") w = this.addWidget("number", "value", first, () => {}, opts);
    else if (typeof first === "boolean") w = this.addWidget("toggle", "value", first, () => {}, opts);
    else w = this.addWidget("text", "value", String(first), () => {}, {});
    const controlValue = values?.[1];
    const wantsControl = typeof controlValue === "string" || !!extras(target?.widget ?? {}).sdControl;
    if (wantsControl && (typeof first === "number" || target?.widget.type === "combo")) {
      const control = this.addWidget("combo", CONTROL_WIDGET_NAME, normaliseControlValue(controlValue ?? "fixed"), () => {}, {
        values: ["fixed", "increment", "decrement", "randomize"],
        serialize: false,
      } as any);
      control.label = "control after generate";
      extras(w).sdControl = control;
      extras(control).sdTarget = w;
    }
    if (target) this.outputs[0].type = target.type;
    this.setSize([Math.max(this.size[0], 260), this.computeSize()[1]]);
  }

  override onConfigure(info: ISerialisedNode): void {
    this.build(Array.isArray(info.widgets_values) ? info.widgets_values : undefined);
  }

  override onConnectionsChange(): void {
    this.build(undefined);
  }
}

export function registerVirtualNodes(): void {
  LiteGraph.registerNodeType("PrimitiveNode", PrimitiveNode);
  (PrimitiveNode as any).category = "utils";
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
