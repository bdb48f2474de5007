// The editor application: owns the graph and canvas, talks to the server, and wires the UI parts.
import {
  LGraph,
  LGraphCanvas,
  LGraphGroup,
  LGraphNode,
  LiteGraph,
} from "@comfyorg/litegraph";
import type { IBaseWidget, ISerialisedGraph } from "./lgtypes";
import { Api, HttpError, PromptError, type ImageRef, type NodeErrors } from "./api";
import { setToken } from "./auth";
import { applyTypeColors } from "./colors";
import { graphToApi, isApiPrompt, serialiseWorkflow, type ApiPrompt } from "./convert";
import { initDomWidgets, isTextAreaWidget, syncDomWidgets } from "./domwidgets";
import { ExecutionTracker, nodeById, showOutputs } from "./execution";
import { buildDefaultGraph, loadApiPrompt } from "./loader";
import { BOX_ZOOM, drawNodeBox, ensureImageRoom, setIssues, visual, type NodeIssue } from "./nodevisuals";
import { comfyClassOf, registerNodeDefs, registerVirtualNodes, registry, setNodeHooks } from "./nodetypes";
import { isPng, readPngText } from "./png";
import { nodeInputs, nodeOutputs, type ObjectInfo } from "./schema";
import { choiceDialog, promptDialog, confirmDialog } from "./ui/dialog";
import { makeTab, TabBar, type StoredTabs, type WorkflowTab } from "./tabs";
import { h } from "./ui/dom";
import { DRAG_MIME, NodeLibrary } from "./ui/library";
import { cachedImageUrl, HistoryPanel, QueuePanel } from "./ui/queue";
import { entryFromDef, NodeSearch, type SearchEntry, type SearchFilter } from "./ui/search";
import { SidePanel } from "./ui/sidepanel";
import { toast } from "./ui/toast";
import { installTooltips } from "./ui/tooltip";
import { Keymap, NEW_BINDINGS, UNSET_BINDINGS } from "./keybindings";
import { Minimap } from "./minimap";
import { Settings } from "./settings";
import { SettingsDialog } from "./ui/settings";
import { copyImage, GalleryPanel, openImage, saveImage } from "./ui/gallery";
import { MaskEditor } from "./ui/maskeditor";
import { loaderFor, MODEL_MIME, ModelLibrary } from "./ui/models";
import { TemplatesBrowser } from "./ui/templates";
import { TopBar } from "./ui/topbar";
import { WorkflowsPanel } from "./ui/workflows";
import { UndoHistory } from "./undo";
import { applyControlAfterGenerate, setWidgetHost } from "./widgets";

const STORE_KEY = "sdflow.workflow";
const STORE_NAME_KEY = "sdflow.workflowName";
const TABS_KEY = "sdflow.tabs";
const MUTED_ALPHA = 0.4;
/** Space between a new group's border and the nodes it holds. */
const GROUP_PADDING = 10;

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function download(name: string, text: string, type = "application/json"): void {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Splits "sub/dir/file.png [input]" into a /view reference. */
export function inputImageRef(value: string): ImageRef {
  let type = "input";
  const m = /^(.*) \[(input|output|temp)\]$/.exec(value);
  if (m) {
    value = m[1];
    type = m[2];
  }
  const i = value.lastIndexOf("/");
  return i < 0 ? { filename: value, subfolder: "", type } : { filename: value.slice(i + 1), subfolder: value.slice(0, i), type };
}

export class App {
  readonly api = new Api();
  readonly graph = new LGraph();
  canvas!: LGraphCanvas;
  canvasEl!: HTMLCanvasElement;
  objectInfo: ObjectInfo = {};
  workflowName = "Untitled";
  batchCount = 1;
  execution!: ExecutionTracker;
  search!: NodeSearch;
  library!: NodeLibrary;
  queuePanel!: QueuePanel;
  historyPanel!: HistoryPanel;
  gallery!: GalleryPanel;
  models!: ModelLibrary;
  readonly maskEditor = new MaskEditor(this.api);
  workflowsPanel!: WorkflowsPanel;
  topbar!: TopBar;
  undo!: UndoHistory;
  side!: SidePanel;
  /** Prompt ids queued from this page, oldest first. */
  readonly queued: string[] = [];
  tabs: WorkflowTab[] = [];
  activeTab!: WorkflowTab;
  tabBar!: TabBar;
  templates!: TemplatesBrowser;
  readonly settings = new Settings(this.api);
  readonly keymap = this.makeKeymap();
  settingsDialog!: SettingsDialog;
  minimap!: Minimap;
  /** The tab each prompt queued from this page came from, so its outputs land there. */
  private promptTabs = new Map<string, string>();
  private queueSize = 0;
  private progressPct: number | null = null;
  private entries: SearchEntry[] = [];
  private overlayEl!: HTMLElement;
  private queueing = false;
  private savedVersion = -1;
  private authPrompt: Promise<boolean> | null = null;

  async start(root: HTMLElement): Promise<void> {
    this.api.onUnauthorized = () => this.askForToken();
    this.buildLayout(root);
    this.setupCanvas();
    registerVirtualNodes();
    setWidgetHost({
      uploadImage: (node, combo) => this.pickAndUpload(node, combo),
      widgetChanged: (node) => node.setDirtyCanvas(true, false),
    });
    setNodeHooks({ nodeValueChanged: (node, name) => this.onNodeValueChanged(node, name) });
    installExecution(this);
    await this.settings.load();
    this.keymap.configure(this.settings.get(NEW_BINDINGS, []), this.settings.get(UNSET_BINDINGS, []));
    this.applySettings();
    this.settings.onChange((id) => this.applySettings(id));

    try {
      await this.loadObjectInfo();
    } catch (e) {
      toast(`Cannot load node definitions from the server: ${errText(e)}`, "error", { timeout: 0 });
      document.body.classList.add("offline");
      this.exposeHook();
      return;
    }
    this.undo = new UndoHistory(this);
    this.undo.onChange = () => this.updateDirty();
    this.restoreTabs();
    this.api.connect();
    this.queuePanel.refresh();
    this.historyPanel.refresh();
    this.workflowsPanel.refresh();
    setInterval(() => this.persist(), 1000);
    window.addEventListener("beforeunload", () => this.persist(true));
    this.exposeHook();
    document.body.classList.add("ready");
  }

  // ---------- layout ----------

  private buildLayout(root: HTMLElement): void {
    this.canvasEl = h("canvas", { id: "graph-canvas", tabindex: "0" });
    const overlay = h("div", { class: "dom-overlay" });
    this.overlayEl = overlay;
    const wrap = h("div", { class: "canvas-wrap" }, this.canvasEl, overlay);
    this.tabBar = new TabBar({
      select: (id) => this.switchTab(id),
      close: (id) => void this.closeTab(id),
      add: () => this.newTab(null, "Untitled"),
    });
    this.search = new NodeSearch(() => this.entries);
    this.library = new NodeLibrary(() => this.entries, (e) => this.addNodeAt(e.name, this.viewCenter()));
    const actions = {
      loadWorkflow: (data: unknown, name: string) => void this.openWorkflow(data, name),
      nodeTitle: (id: string) => nodeById(this.graph, id)?.title,
    };
    this.queuePanel = new QueuePanel(this.api, actions);
    this.historyPanel = new HistoryPanel(this.api, actions);
    this.models = new ModelLibrary(this.api, () => this.objectInfo, (folder, file) => void this.addModelNode(folder, file, this.viewCenter()));
    this.gallery = new GalleryPanel(this.api, {
      loadWorkflow: (data, name) => void this.openWorkflow(data, name),
      sendToLoadImage: (ref) => void this.sendToLoadImage(ref),
    });
    this.workflowsPanel = new WorkflowsPanel(this.api, (d, n) => void this.openWorkflow(d, n), () => this.saveWorkflow());
    this.side = new SidePanel([
      { id: "queue", label: "Queue", el: this.queuePanel.el, onShow: () => this.queuePanel.refresh() },
      { id: "history", label: "History", el: this.historyPanel.el, onShow: () => this.historyPanel.refresh() },
      { id: "gallery", label: "Gallery", el: this.gallery.el, onShow: () => this.gallery.refresh() },
      { id: "nodes", label: "Nodes", el: this.library.el, onShow: () => this.library.render() },
      { id: "models", label: "Models", el: this.models.el, onShow: () => void this.models.refresh() },
      { id: "workflows", label: "Saved", el: this.workflowsPanel.el, onShow: () => this.workflowsPanel.refresh() },
    ]);
    this.settingsDialog = new SettingsDialog(this.settings, this.keymap);
    this.templates = new TemplatesBrowser(this.api, (wf, name) => this.openWorkflow(wf, name));
    this.topbar = new TopBar(this);
    this.queuePanel.onCountChange = (r, p) => this.setQueueSize(r + p);
    const column = h("div", { class: "editor-column" }, this.tabBar.el, wrap);
    const main = h("main", { class: "workspace" }, column, this.side.el);
    root.replaceChildren(this.topbar.el, main);
    this.setupDrop(wrap);
  }

  private setupCanvas(): void {
    LiteGraph.release_link_on_empty_shows_menu = false;
    // The node menu's "Mode" list, indexed by mode number: only always / muted / bypassed mean
    // anything to the server (null entries render as separators).
    (LiteGraph as any).NODE_MODES = ["Always", null, "Never (muted)", null, "Bypass"];
    LiteGraph.alwaysSnapToGrid = false;
    LiteGraph.snaps_for_comfy = true;
    LiteGraph.NODE_DEFAULT_BGCOLOR = "#262a33";
    LiteGraph.NODE_DEFAULT_COLOR = "#323844";
    LiteGraph.NODE_TITLE_COLOR = "#d8dde6";
    LiteGraph.NODE_SELECTED_TITLE_COLOR = "#ffffff";
    LiteGraph.NODE_TEXT_COLOR = "#b7bfcc";
    LiteGraph.NODE_DEFAULT_BOXCOLOR = "#5d6677";
    LiteGraph.NODE_BOX_OUTLINE_COLOR = "#8fb4ff";
    LiteGraph.NODE_ERROR_COLOUR = "#ff4d4f";
    LiteGraph.WIDGET_BGCOLOR = "#1b1e25";
    LiteGraph.WIDGET_OUTLINE_COLOR = "#3a4150";
    LiteGraph.WIDGET_TEXT_COLOR = "#dfe4ec";
    LiteGraph.WIDGET_SECONDARY_TEXT_COLOR = "#8b93a1";
    LiteGraph.LINK_COLOR = "#8a94a6";
    LiteGraph.NODE_FONT = "Inter, system-ui, sans-serif";
    LiteGraph.DEFAULT_SHADOW_COLOR = "rgba(0,0,0,0.45)";
    LiteGraph.ROUND_RADIUS = 8;

    const canvas = new LGraphCanvas(this.canvasEl, this.graph);
    this.canvas = canvas;
    canvas.background_image = "";
    canvas.clear_background_color = "#14161b";
    canvas.allow_searchbox = false;
    canvas.render_canvas_border = false;
    // litegraph stops drawing titles and widget text below 0.6 zoom; a fitted default graph on a laptop
    // screen lands around there, so keep text down to 0.4 where it is still readable.
    canvas.low_quality_zoom_threshold = 0.4;
    canvas.show_info = false;
    canvas.links_render_mode = LiteGraph.SPLINE_LINK;
    canvas.connections_width = 3;
    canvas.onDrawBackground = (ctx, area) => this.drawGrid(ctx, area);
    this.minimap = new Minimap(canvas, () => this.graph);
    this.canvasEl.parentElement!.append(this.minimap.el);
    canvas.onDrawForeground = () => {
      syncDomWidgets();
      this.minimap.update();
    };
    initDomWidgets(canvas, this.overlayEl);
    this.adjustMenus(canvas);
    // Muted nodes are drawn faded, as ComfyUI shows them: they stay in the workflow but do not run.
    const drawNode = canvas.drawNode.bind(canvas);
    canvas.drawNode = (node: LGraphNode, ctx: CanvasRenderingContext2D) => {
      if (canvas.ds.scale < BOX_ZOOM) return drawNodeBox(canvas, node, ctx);
      if (node.mode !== 2) return drawNode(node, ctx);
      const alpha = canvas.editor_alpha;
      canvas.editor_alpha = alpha * MUTED_ALPHA;
      try {
        drawNode(node, ctx);
      } finally {
        canvas.editor_alpha = alpha;
      }
    };
    applyTypeColors(canvas, ["MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

    const wrap = this.canvasEl.parentElement!;
    const resize = () => {
      const dpr = window.devicePixelRatio || 1;
      const { width, height } = wrap.getBoundingClientRect();
      this.canvasEl.width = Math.max(1, Math.round(width * dpr));
      this.canvasEl.height = Math.max(1, Math.round(height * dpr));
      this.canvasEl.style.width = `${width}px`;
      this.canvasEl.style.height = `${height}px`;
      this.canvasEl.getContext("2d")?.scale(dpr, dpr);
      canvas.draw(true, true);
    };
    new ResizeObserver(resize).observe(wrap);
    resize();

    // Double-click on empty canvas: node search at the pointer.
    this.canvasEl.addEventListener("litegraph:canvas", (ev: Event) => {
      const detail = (ev as CustomEvent).detail;
      if (detail?.subType === "empty-double-click") {
        const e = detail.originalEvent;
        this.openSearch(e.clientX, e.clientY, [e.canvasX, e.canvasY]);
      }
    });
    // A link released on empty canvas: search filtered to nodes that can take it, then connect.
    canvas.linkConnector.events.addEventListener("dropped-on-canvas", (ev: CustomEvent) => {
      const e = ev.detail;
      const first = canvas.linkConnector.renderLinks[0];
      if (!first || !(first.node as LGraphNode).graph) return;
      const fromNode = first.node as LGraphNode;
      const direction = canvas.linkConnector.state.connectingTo === "input" ? "input" : "output";
      const slotIndex = first.fromSlotIndex;
      const type = String(first.fromSlot.type ?? "*");
      this.openSearch(e.clientX, e.clientY, [e.canvasX, e.canvasY], { direction, type }, (node) => {
        this.connectNew(fromNode, slotIndex, direction, type, node);
      });
    });
    // Refused drops get a message instead of silently doing nothing.
    let created = false;
    canvas.linkConnector.events.addEventListener("link-created", () => (created = true));
    canvas.linkConnector.events.addEventListener("after-drop-links", (ev: CustomEvent) => {
      const { renderLinks, event } = ev.detail;
      const first = renderLinks?.[0];
      const target = event ? this.graph.getNodeOnPos(event.canvasX, event.canvasY) : null;
      if (!created && first && target && target !== first.node) {
        const type = String(first.fromSlot?.type ?? "?");
        const slot = target.getInputOnPos?.([event.canvasX, event.canvasY]) ?? target.getOutputOnPos?.([event.canvasX, event.canvasY]);
        const where = slot ? `${slot.name} (${slot.type})` : target.title;
        toast(`Cannot connect ${type} to ${where}: the types do not match`, "warning");
        this.lastRefusedLink = { type, target: target.id, slot: slot?.name };
      }
      created = false;
    });
    installTooltips(canvas, this.canvasEl);
    canvas.startRendering?.();
  }

  /** The last link drop the editor refused (read by tests through the hook). */
  lastRefusedLink: { type: string; target: unknown; slot?: string } | null = null;

  private gridPattern: CanvasPattern | null = null;

  /** A faint 40-unit grid, filled from a tiled pattern (one fill per frame, not hundreds of lines). */
  private drawGrid(ctx: CanvasRenderingContext2D, area: any): void {
    if (this.canvas.ds.scale < 0.35) return;
    if (!this.gridPattern) {
      const tile = document.createElement("canvas");
      tile.width = tile.height = 40;
      const g = tile.getContext("2d")!;
      g.fillStyle = "rgba(255,255,255,0.04)";
      g.fillRect(0, 0, 40, 1);
      g.fillRect(0, 0, 1, 40);
      this.gridPattern = ctx.createPattern(tile, "repeat");
    }
    if (!this.gridPattern) return;
    ctx.save();
    ctx.fillStyle = this.gridPattern;
    ctx.fillRect(area[0], area[1], area[2], area[3]);
    ctx.restore();
  }

  private setupDrop(wrap: HTMLElement): void {
    wrap.addEventListener("dragover", (e) => {
      e.preventDefault();
      if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
      wrap.classList.add("dragging");
    });
    wrap.addEventListener("dragleave", () => wrap.classList.remove("dragging"));
    wrap.addEventListener("drop", async (e) => {
      e.preventDefault();
      wrap.classList.remove("dragging");
      const pos = this.clientToGraph(e.clientX, e.clientY);
      const type = e.dataTransfer?.getData(DRAG_MIME);
      if (type) {
        this.addNodeAt(type, pos);
        return;
      }
      const model = e.dataTransfer?.getData(MODEL_MIME);
      if (model) {
        const { folder, name } = JSON.parse(model);
        this.addModelNode(folder, name, pos);
        return;
      }
      const file = e.dataTransfer?.files?.[0];
      if (!file) return;
      // An image dropped on an image-loading node is uploaded into it, not read as a workflow.
      const target = this.graph.getNodeOnPos(pos[0], pos[1]);
      const combo = target?.widgets?.find((w) => w.type === "combo" && target.widgets?.some((b) => b.name === "upload"));
      if (target && combo && file.type.startsWith("image/")) {
        await this.uploadInto(target, combo, file);
        return;
      }
      await this.handleFile(file, pos);
    });
  }

  // ---------- schema ----------

  async loadObjectInfo(): Promise<void> {
    const info = await this.api.getObjectInfo();
    this.objectInfo = info;
    registerNodeDefs(info);
    const types = new Set<string>();
    for (const def of Object.values(info)) {
      for (const i of nodeInputs(def)) types.add(i.type);
      for (const o of nodeOutputs(def)) types.add(o.type);
    }
    applyTypeColors(this.canvas, types);
    this.entries = Object.values(info).filter((d) => d && !d.deprecated).map(entryFromDef);
    this.entries.push(
      { name: "Reroute", title: "Reroute", category: "utils", description: "A dot that passes a link through, to tidy wiring.", inputTypes: ["*"], outputTypes: ["*"] },
      { name: "Note", title: "Note", category: "utils", description: "A text note on the canvas; never sent to the server.", inputTypes: [], outputTypes: [] },
      { name: "PrimitiveNode", title: "Primitive", category: "utils", description: "Holds one value for the widget inputs it is linked to, e.g. one seed shared by several samplers.", inputTypes: [], outputTypes: ["*"] },
    );
    this.library.render();
  }

  /** Re-reads /object_info and updates combo lists (new checkpoints, uploaded images…). */
  async refreshNodeDefs(): Promise<void> {
    try {
      await this.loadObjectInfo();
    } catch (e) {
      toast(`Refresh failed: ${errText(e)}`, "error");
      return;
    }
    let updated = 0;
    for (const node of this.graph.nodes) {
      const def = registry.get(comfyClassOf(node));
      if (!def) continue;
      const inputs = new Map(nodeInputs(def).map((i) => [i.name, i]));
      for (const w of node.widgets ?? []) {
        const input = inputs.get(w.name);
        if (w.type !== "combo" || !input?.values) continue;
        (w.options as any).values = input.values;
        updated++;
      }
    }
    this.graph.setDirtyCanvas(true, true);
    toast(`Node definitions refreshed (${Object.keys(this.objectInfo).length} nodes, ${updated} lists)`, "success");
  }

  // ---------- graph editing ----------

  viewCenter(): [number, number] {
    const r = this.canvasEl.getBoundingClientRect();
    return this.clientToGraph(r.left + r.width / 2, r.top + r.height / 2);
  }

  clientToGraph(x: number, y: number): [number, number] {
    const r = this.canvasEl.getBoundingClientRect();
    const { scale, offset } = this.canvas.ds;
    return [(x - r.left) / scale - offset[0], (y - r.top) / scale - offset[1]];
  }

  graphToClient(x: number, y: number): [number, number] {
    const r = this.canvasEl.getBoundingClientRect();
    const { scale, offset } = this.canvas.ds;
    return [r.left + (x + offset[0]) * scale, r.top + (y + offset[1]) * scale];
  }

  addNodeAt(type: string, pos: [number, number]): LGraphNode | null {
    const node = LiteGraph.createNode(type);
    if (!node) {
      toast(`Unknown node type ${type}`, "error");
      return null;
    }
    this.graph.beforeChange();
    // Several adds at the same spot (e.g. clicks in the library) fan out instead of stacking.
    let [x, y] = pos;
    for (let i = 0; i < 20 && this.graph.nodes.some((n) => Math.abs(n.pos[0] - x) < 8 && Math.abs(n.pos[1] - y) < 8); i++) {
      x += 30;
      y += 30;
    }
    // A node added near the right or bottom edge is pulled in so all of it shows (not under the panel).
    const r = this.canvasEl.getBoundingClientRect();
    const [vx, vy] = this.clientToGraph(r.right, r.bottom);
    const [ux, uy] = this.clientToGraph(r.left, r.top);
    const size = node.size;
    x = Math.max(ux + 8, Math.min(x, vx - size[0] - 16));
    y = Math.max(uy + LiteGraph.NODE_TITLE_HEIGHT + 8, Math.min(y, vy - size[1] - 16));
    node.pos = [x, y];
    this.graph.add(node);
    this.graph.afterChange();
    this.canvas.selectItems([node]);
    this.canvas.setDirty(true, true);
    return node;
  }

  openSearch(clientX: number, clientY: number, graphPos: [number, number], filter?: SearchFilter, then?: (node: LGraphNode) => void): void {
    this.search.open({
      clientX,
      clientY,
      filter,
      onPick: (entry) => {
        const node = this.addNodeAt(entry.name, graphPos);
        if (node && then) then(node);
      },
    });
  }

  /** Connects a node created from a released link to the slot the link came from. */
  private connectNew(from: LGraphNode, slot: number, direction: "input" | "output", type: string, node: LGraphNode): void {
    if (direction === "input") {
      const idx = node.inputs.findIndex((i) => LiteGraph.isValidConnection(type, i.type) && i.link == null);
      if (idx >= 0) from.connect(slot, node, idx);
    } else {
      const idx = node.outputs.findIndex((o) => LiteGraph.isValidConnection(o.type, type));
      if (idx >= 0) node.connect(idx, from, slot);
      // Move the new node to the left of the input it feeds.
      node.pos = [node.pos[0] - node.size[0], node.pos[1]];
    }
    this.canvas.setDirty(true, true);
  }

  /** Commands and their default keys (the settings dialog lets the user change them). */
  private makeKeymap(): Keymap {
    const c = (id: string, label: string, run: () => void, global = false) => ({ id, label, run, global });
    const k = (commandId: string, key: string, mods: { ctrl?: boolean; alt?: boolean; shift?: boolean } = {}) => ({ commandId, combo: { key, ...mods } });
    return new Keymap([
      c("Comfy.QueuePrompt", "Queue the graph (batch count times)", () => void this.queuePrompt(this.batchCount), true),
      c("Comfy.QueuePromptFront", "Queue at the front of the queue", () => void this.queuePrompt(this.batchCount, true), true),
      c("Comfy.Interrupt", "Interrupt the running prompt", () => void this.queuePanel.interrupt(), true),
      c("Comfy.SaveWorkflow", "Save the workflow", () => void this.saveWorkflow(), true),
      c("Comfy.OpenWorkflow", "Open a workflow (.json or .png)", () => this.openFile(), true),
      c("Comfy.Undo", "Undo", () => void this.undo?.undo()),
      c("Comfy.Redo", "Redo", () => void this.undo?.redo()),
      c("Comfy.Canvas.ToggleSelectedNodes.Mute", "Mute / unmute the selected nodes", () => this.toggleMode(2)),
      c("Comfy.Canvas.ToggleSelectedNodes.Bypass", "Bypass / un-bypass the selected nodes", () => this.toggleMode(4)),
      c("Comfy.Graph.GroupSelectedNodes", "Group the selected nodes", () => void this.groupSelected()),
      c("Comfy.Canvas.FitView", "Fit the whole graph in view", () => this.fitView()),
      c("Comfy.NewBlankWorkflow", "New workflow tab", () => this.newGraph()),
      c("Comfy.BrowseTemplates", "Browse templates", () => void this.templates.show()),
      c("Comfy.ShowSettingsDialog", "Settings", () => this.settingsDialog.show()),
      c("Comfy.Canvas.ToggleMinimap", "Show / hide the minimap", () => void this.settings.set("Comfy.Minimap.Visible", !this.minimap.visible)),
    ], [
      k("Comfy.QueuePrompt", "Enter", { ctrl: true }),
      k("Comfy.QueuePromptFront", "Enter", { ctrl: true, shift: true }),
      k("Comfy.Interrupt", "Enter", { ctrl: true, alt: true }),
      k("Comfy.SaveWorkflow", "s", { ctrl: true }),
      k("Comfy.OpenWorkflow", "o", { ctrl: true }),
      k("Comfy.Undo", "z", { ctrl: true }),
      k("Comfy.Redo", "y", { ctrl: true }),
      k("Comfy.Redo", "z", { ctrl: true, shift: true }),
      k("Comfy.Canvas.ToggleSelectedNodes.Mute", "m", { ctrl: true }),
      k("Comfy.Canvas.ToggleSelectedNodes.Bypass", "b", { ctrl: true }),
      k("Comfy.Graph.GroupSelectedNodes", "g", { ctrl: true }),
      k("Comfy.Canvas.FitView", "."),
      k("Comfy.ShowSettingsDialog", ",", { ctrl: true }),
      k("Comfy.Canvas.ToggleMinimap", "m", { alt: true }),
    ]);
  }

  /** Applies one setting (or all) to the canvas. */
  applySettings(id?: string): void {
    const all = id === undefined;
    if (all || id === "Comfy.LinkRenderMode") {
      const mode = Number(this.settings.get("Comfy.LinkRenderMode"));
      if (this.canvas) this.canvas.links_render_mode = [0, 1, 2].includes(mode) ? mode : LiteGraph.SPLINE_LINK;
    }
    if ((all || id === "Comfy.Minimap.Visible") && this.minimap) this.minimap.visible = !!this.settings.get("Comfy.Minimap.Visible");
    if (all || id === "sdflow.Canvas.SnapToGrid") LiteGraph.alwaysSnapToGrid = !!this.settings.get("sdflow.Canvas.SnapToGrid");
    this.canvas?.setDirty(true, true);
  }

  /** Menus offer only what works here: subgraphs are not implemented, so "Convert to Subgraph" goes. */
  private adjustMenus(canvas: LGraphCanvas): void {
    const keep = (o: any) => !(o && typeof o.content === "string" && /subgraph/i.test(o.content));
    const nodeMenu = canvas.getNodeMenuOptions.bind(canvas);
    canvas.getNodeMenuOptions = (node: LGraphNode) => {
      const opts = nodeMenu(node).filter(keep);
      const combo = node.widgets?.some((w) => w.name === "upload") ? node.widgets.find((w) => w.type === "combo") : undefined;
      if (combo && typeof combo.value === "string" && combo.value) {
        return [{ content: "Open in MaskEditor", callback: () => void this.editMask(node, combo) }, null, ...opts];
      }
      const ref: ImageRef | undefined = (node as any).sdflowOutputs?.[0];
      if (!ref) return opts;
      const run = (label: string, fn: () => unknown) => ({
        content: label,
        callback: () => {
          Promise.resolve(fn()).catch((e) => toast(`${label} failed: ${errText(e)}`, "error"));
        },
      });
      // Image actions on a node showing outputs (the first image of a batch).
      return [
        run("Open image", () => openImage(this.api, ref)),
        run("Save image", () => saveImage(this.api, ref)),
        run("Copy image", () => copyImage(this.api, ref)),
        run("Send to LoadImage", () => this.sendToLoadImage(ref)),
        null,
        ...opts,
      ];
    };
    const canvasMenu = canvas.getCanvasMenuOptions.bind(canvas);
    canvas.getCanvasMenuOptions = () => canvasMenu().filter(keep);
  }

  /** Ctrl+G: a group around the selected nodes (titled "Group"; double-click the title to rename). */
  groupSelected(): LGraphGroup | null {
    const nodes = [...this.canvas.selectedItems].filter((i): i is LGraphNode => i instanceof LGraphNode);
    if (!nodes.length) {
      toast("Select the nodes to group first", "info", { timeout: 2000 });
      return null;
    }
    const group = new LGraphGroup("Group");
    this.graph.beforeChange();
    group.resizeTo(nodes, GROUP_PADDING);
    this.graph.add(group);
    group.recomputeInsideNodes();
    this.graph.afterChange();
    this.graph._version++;
    this.canvas.setDirty(true, true);
    return group;
  }

  fitView(): void {
    const nodes = this.graph.nodes;
    if (!nodes.length) {
      this.canvas.ds.scale = 1;
      this.canvas.ds.offset = [0, 0];
      this.canvas.setDirty(true, true);
      return;
    }
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
      x0 = Math.min(x0, n.pos[0]);
      y0 = Math.min(y0, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
      x1 = Math.max(x1, n.pos[0] + n.size[0]);
      y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const r = this.canvasEl.getBoundingClientRect();
    const pad = 60;
    const scale = Math.max(0.1, Math.min(1.1, Math.min((r.width - pad * 2) / (x1 - x0), (r.height - pad * 2) / (y1 - y0))));
    this.canvas.ds.scale = scale;
    this.canvas.ds.offset = [(r.width / scale - (x1 - x0)) / 2 - x0, (r.height / scale - (y1 - y0)) / 2 - y0];
    this.canvas.setDirty(true, true);
  }

  /** Toggles mute (2) or bypass (4) on the selected nodes (Ctrl+M / Ctrl+B). */
  toggleMode(mode: 2 | 4): void {
    const nodes = [...this.canvas.selectedItems].filter((i): i is LGraphNode => (i as LGraphNode).inputs !== undefined && "mode" in (i as any));
    if (!nodes.length) return;
    const target = nodes.every((n) => n.mode === mode) ? 0 : mode;
    for (const n of nodes) n.mode = target;
    this.graph._version++;
    this.canvas.setDirty(true, true);
  }

  // ---------- load / save ----------

  private restoreOrDefault(): void {
    const saved = localStorage.getItem(STORE_KEY);
    if (saved) {
      try {
        this.loadGraphData(JSON.parse(saved), localStorage.getItem(STORE_NAME_KEY) ?? "Untitled", { quiet: true, keepView: true });
        return;
      } catch (e) {
        console.warn("stored workflow unreadable, starting with the default graph", e);
      }
    }
    this.loadDefault();
  }

  loadDefault(): void {
    const missing = buildDefaultGraph(this.graph);
    this.setName("Untitled");
    this.fitView();
    if (missing.length) toast(`The server has no ${missing.join(", ")}: the default graph is incomplete`, "warning");
  }

  /** "New": an empty workflow in a new tab. */
  newGraph(): void {
    this.newTab(null, "Untitled");
  }

  /** "Load default graph" from the menu: asks before replacing unsaved work. */
  async openDefault(): Promise<void> {
    const scratch = new LGraph();
    buildDefaultGraph(scratch);
    await this.openWorkflow(serialiseWorkflow(scratch), "Untitled");
  }

  setName(name: string): void {
    this.workflowName = name || "Untitled";
    this.topbar?.setName(this.workflowName);
    if (this.activeTab && this.activeTab.name !== this.workflowName) {
      this.activeTab.name = this.workflowName;
      this.renderTabs();
    }
    this.updateTitle();
  }

  /** The page title: progress and queue size first (they show in the browser's tab strip), as ComfyUI does. */
  updateTitle(): void {
    const pct = this.progressPct !== null ? `[${this.progressPct}%]` : "";
    const queue = this.queueSize > 0 ? `[${this.queueSize}]` : "";
    const dirty = this.activeTab?.dirty ? "*" : "";
    document.title = `${pct}${queue}${pct || queue ? " " : ""}${dirty}${this.workflowName} - sdflow`;
  }

  setQueueSize(n: number): void {
    this.queueSize = n;
    this.topbar.setQueueCount(n);
    if (n === 0) this.progressPct = null;
    this.updateTitle();
  }

  setProgress(p: { value?: number; max?: number } | null): void {
    this.progressPct = p?.max ? Math.round((100 * (p.value ?? 0)) / p.max) : null;
    this.updateTitle();
  }

  // ---------- tabs ----------

  private renderTabs(): void {
    this.tabBar?.render(this.tabs, this.activeTab?.id ?? "");
  }

  /** Recomputes the unsaved mark of the shown tab from the undo history's current state. */
  private updateDirty(): void {
    const t = this.activeTab;
    if (!t || !this.undo) return;
    const dirty = this.undo.state !== t.clean;
    if (dirty !== t.dirty) {
      t.dirty = dirty;
      this.renderTabs();
      this.updateTitle();
    }
    this.persist();
  }

  /** Marks the shown tab as matching what was just loaded or saved. */
  private markClean(): void {
    this.undo.check();
    this.activeTab.clean = this.undo.state;
    this.activeTab.dirty = false;
    this.renderTabs();
    this.updateTitle();
    this.persist(true);
  }

  private restoreTabs(): void {
    let stored: StoredTabs | null = null;
    try {
      stored = JSON.parse(localStorage.getItem(TABS_KEY) ?? "null");
    } catch {
      stored = null;
    }
    if (stored && Array.isArray(stored.tabs) && stored.tabs.length) {
      this.tabs = stored.tabs.map((t) => ({ ...makeTab(t.name || "Untitled", t.workflow ?? null), id: t.id, dirty: !!t.dirty }));
      const active = this.tabs.find((t) => t.id === stored!.active) ?? this.tabs[0];
      this.activeTab = active;
      this.showTab(active);
      return;
    }
    const tab = makeTab("Untitled");
    this.tabs = [tab];
    this.activeTab = tab;
    this.undo.quietly(() => this.restoreOrDefault());
    this.undo.reset();
    tab.name = this.workflowName;
    tab.clean = this.undo.state;
    this.updateDirty();
    this.renderTabs();
    this.updateTitle();
  }

  /** Puts the graph of the shown tab into the tab, so another can be shown. */
  private stashActive(): void {
    const t = this.activeTab;
    if (!t) return;
    t.history = this.undo.save();
    t.workflow = this.serialize();
  }

  /** Shows `tab` on the canvas: its graph, outputs and undo history. */
  private showTab(tab: WorkflowTab): void {
    this.activeTab = tab;
    this.canvas.deselectAll();
    this.undo.quietly(() => {
      if (tab.workflow) {
        try {
          this.loadGraphData(tab.workflow, tab.name, { quiet: true, keepView: true });
        } catch (e) {
          console.warn(`tab ${tab.name}: workflow unreadable`, e);
          this.graph.clear();
        }
      } else {
        this.graph.clear();
        this.setName(tab.name);
        this.fitView();
      }
      this.applyOutputs(tab);
    });
    if (tab.history) this.undo.load(tab.history);
    else this.undo.reset();
    // A tab restored with unsaved changes stays marked until saved.
    if (!tab.clean) tab.clean = tab.dirty ? "\u0000unsaved" : this.undo.state;
    tab.workflow = null;
    this.updateDirty();
    this.setName(tab.name);
    this.renderTabs();
    this.updateTitle();
    this.persist(true);
  }

  switchTab(id: string): void {
    const tab = this.tabs.find((t) => t.id === id);
    if (!tab || tab === this.activeTab) return;
    this.stashActive();
    this.showTab(tab);
  }

  /** Opens a workflow (or an empty graph) in a new tab and shows it. */
  newTab(workflow: unknown, name: string): WorkflowTab {
    this.stashActive();
    const tab = makeTab(name);
    this.tabs.push(tab);
    this.activeTab = tab;
    this.canvas.deselectAll();
    this.undo.quietly(() => {
      if (workflow) this.loadGraphData(workflow, name, { quiet: true });
      else {
        this.graph.clear();
        this.setName(name);
        this.fitView();
      }
    });
    this.undo.reset();
    tab.clean = this.undo.state;
    this.updateDirty();
    this.setName(name);
    this.renderTabs();
    this.updateTitle();
    this.persist(true);
    return tab;
  }

  async closeTab(id: string): Promise<void> {
    const tab = this.tabs.find((t) => t.id === id);
    if (!tab) return;
    if (tab.dirty && !(await confirmDialog("Close tab", `“${tab.name}” has unsaved changes. Close it anyway?`, "Close without saving"))) return;
    const i = this.tabs.indexOf(tab);
    this.tabs.splice(i, 1);
    if (!this.tabs.length) {
      this.activeTab = undefined as unknown as WorkflowTab;
      this.newTab(null, "Untitled");
      return;
    }
    if (tab === this.activeTab) this.showTab(this.tabs[Math.min(i, this.tabs.length - 1)]);
    else {
      this.renderTabs();
      this.persist(true);
    }
  }

  /**
   * Loads a workflow the user asked for (file, drop, history, saved list, template) into the shown
   * tab, first asking whether to keep unsaved work: open in a new tab, replace, or cancel.
   */
  async openWorkflow(data: unknown, name: string): Promise<boolean> {
    const t = this.activeTab;
    this.undo.check();
    if (t.dirty && this.graph.nodes.length && this.settings.get("sdflow.Workflow.ConfirmReplace")) {
      const choice = await choiceDialog("Unsaved changes", `“${t.name}” has unsaved changes. Open “${name}” in a new tab, or replace the current graph?`, [
        { label: "Cancel", value: "cancel" },
        { label: "Replace", value: "replace", kind: "danger" },
        { label: "Open in new tab", value: "tab", kind: "primary" },
      ]);
      if (choice === "tab") {
        this.newTab(data, name);
        toast(`Opened ${name}`, "success", { timeout: 2000 });
        return true;
      }
      if (choice !== "replace") return false;
    }
    this.canvas.deselectAll();
    this.loadGraphData(data, name);
    t.outputs.clear();
    this.markClean();
    return true;
  }

  /** Shows the outputs a tab's runs produced on its nodes (after a tab switch or an undo). */
  private applyOutputs(tab: WorkflowTab): void {
    for (const n of this.graph.nodes) {
      const o = tab.outputs.get(String(n.id));
      if (o && o.type === n.type) showOutputs(n, o.refs, o.images);
    }
  }

  /** The graph showing a prompt's workflow: the canvas when its tab is shown (or it is not ours). */
  graphForPrompt(promptId: string | undefined): LGraph | null {
    const tabId = promptId ? this.promptTabs.get(promptId) : undefined;
    if (!tabId || tabId === this.activeTab?.id || !this.tabs.some((t) => t.id === tabId)) return this.graph;
    return null;
  }

  onOutputs(promptId: string | undefined, nodeId: string, refs: ImageRef[], imgs: HTMLImageElement[]): void {
    const tabId = promptId ? this.promptTabs.get(promptId) : undefined;
    const tab = this.tabs.find((t) => t.id === tabId) ?? this.activeTab;
    if (tab === this.activeTab) {
      const n = nodeById(this.graph, nodeId);
      if (!n) return;
      tab.outputs.set(nodeId, { type: n.type, images: imgs, refs });
      showOutputs(n, refs, imgs);
    } else {
      const type = tab.workflow?.nodes?.find((n) => String(n.id) === nodeId)?.type;
      if (type) tab.outputs.set(nodeId, { type: String(type), images: imgs, refs });
    }
  }

  /** Puts back a graph recorded by the undo history, leaving the view where the user has it. */
  restoreSnapshot(wf: ISerialisedGraph): void {
    this.canvas.deselectAll();
    this.loadGraphData(wf, this.workflowName, { quiet: true, keepViewAlways: true });
    // Outputs are not part of the workflow: put back the images the restored nodes had.
    this.applyOutputs(this.activeTab);
  }

  /** Loads a UI workflow (v0.4 or v1) or an API prompt. */
  loadGraphData(data: unknown, name = "Untitled", opts: { quiet?: boolean; keepView?: boolean; keepViewAlways?: boolean } = {}): void {
    if (typeof data === "string") data = JSON.parse(data);
    let missing: string[] = [];
    if (isApiPrompt(data)) {
      missing = loadApiPrompt(this.graph, data as ApiPrompt);
      this.fitView();
    } else if (data && typeof data === "object" && Array.isArray((data as any).nodes)) {
      const wf = data as ISerialisedGraph;
      missing = [...new Set((wf.nodes ?? []).map((n) => String(n.type)).filter((t) => !LiteGraph.registered_node_types[t]))];
      this.graph.configure(JSON.parse(JSON.stringify(wf)));
      for (const n of this.graph.nodes) {
        if (!LiteGraph.registered_node_types[n.type] && (n as any).last_serialization) {
          n.has_errors = true;
          setIssues(n, [{ message: `Unknown node type ${(n as any).last_serialization.type}` }]);
        }
      }
      const ds = (wf.extra as any)?.ds;
      if (opts.keepViewAlways) {
        /* undo/redo: leave the view where the user has it */
      } else if (opts.keepView && ds?.offset && ds?.scale) {
        this.canvas.ds.offset = [ds.offset[0], ds.offset[1]];
        this.canvas.ds.scale = ds.scale;
      } else this.fitView();
    } else {
      throw new Error("This is neither a workflow nor an API prompt");
    }
    this.setName(name);
    this.canvas.setDirty(true, true);
    this.savedVersion = -1;
    if (missing.length) toast(`Missing node types: ${missing.join(", ")}`, "warning", { details: "They are kept in the workflow but cannot run on this server." });
    else if (!opts.quiet) toast(`Loaded ${name}`, "success", { timeout: 2000 });
  }

  async handleFile(file: File, dropPos?: [number, number]): Promise<void> {
    try {
      const buf = new Uint8Array(await file.arrayBuffer());
      const base = file.name.replace(/\.(json|png)$/i, "");
      if (isPng(buf)) {
        const text = await readPngText(buf);
        if (text.workflow) await this.openWorkflow(JSON.parse(text.workflow), base);
        else if (text.prompt) await this.openWorkflow(JSON.parse(text.prompt), base);
        else if (!(await this.imageAsLoadNode(file, dropPos))) toast(`${file.name} carries no workflow`, "error");
        return;
      }
      if (file.type.startsWith("image/")) {
        if (!(await this.imageAsLoadNode(file, dropPos))) toast(`${file.name} carries no workflow`, "error");
        return;
      }
      await this.openWorkflow(JSON.parse(new TextDecoder().decode(buf)), base);
    } catch (e) {
      toast(`Cannot load ${file.name}: ${errText(e)}`, "error");
    }
  }

  /** A model from the library: its loader node, with the file chosen. */
  addModelNode(folder: string, file: string, pos: [number, number]): LGraphNode | null {
    const loader = loaderFor(this.objectInfo, folder, file);
    if (!loader) {
      toast(`No loader node for ${folder}`, "warning");
      return null;
    }
    const node = this.addNodeAt(loader.type, pos);
    const w = node?.widgets?.find((x) => x.name === loader.input);
    if (!node || !w) return node;
    const values = (w.options as any)?.values;
    if (Array.isArray(values) && !values.includes(file)) values.push(file);
    w.value = file;
    node.onWidgetChanged?.(w.name, file, undefined, w);
    this.graph._version++;
    this.canvas.setDirty(true, true);
    return node;
  }

  /** Opens the mask editor on a LoadImage node's image; a saved mask switches the node to the masked copy. */
  async editMask(node: LGraphNode, combo: IBaseWidget): Promise<void> {
    try {
      await this.maskEditor.open(inputImageRef(String(combo.value)), ({ value }) => {
        const values = (combo.options as any).values as unknown[];
        if (Array.isArray(values) && !values.includes(value)) values.push(value);
        combo.value = value;
        this.onNodeValueChanged(node, combo.name);
        this.graph._version++;
        this.canvas.setDirty(true, true);
      });
    } catch (e) {
      toast(`Cannot open the mask editor: ${errText(e)}`, "error");
    }
  }

  /** "Send to LoadImage": the output image is uploaded as an input and a LoadImage node takes it. */
  async sendToLoadImage(ref: ImageRef): Promise<void> {
    const res = await this.api.fetchApi(this.api.viewPath(ref));
    if (!res.ok) {
      toast(`Cannot read ${ref.filename}: ${res.status}`, "error");
      return;
    }
    const blob = await res.blob();
    const file = new File([blob], ref.filename, { type: blob.type || "image/png" });
    const [x, y] = this.viewCenter();
    if (!(await this.imageAsLoadNode(file, [x, y]))) toast("This server has no LoadImage node", "error");
  }

  /** A plain image dropped on the canvas becomes a LoadImage node holding it. */
  private async imageAsLoadNode(file: File, pos?: [number, number]): Promise<boolean> {
    if (!LiteGraph.registered_node_types.LoadImage) return false;
    const node = this.addNodeAt("LoadImage", pos ?? this.viewCenter());
    const combo = node?.widgets?.find((w) => w.type === "combo");
    if (!node || !combo) return false;
    await this.uploadInto(node, combo, file);
    return true;
  }

  openFile(): void {
    const input = h("input", { type: "file", accept: ".json,.png,application/json,image/png" });
    input.onchange = () => {
      const f = input.files?.[0];
      if (f) this.handleFile(f);
    };
    input.click();
  }

  serialize(): ISerialisedGraph {
    return serialiseWorkflow(this.graph);
  }

  async saveWorkflow(): Promise<void> {
    const name = await promptDialog("Save workflow", this.workflowName === "Untitled" ? "" : this.workflowName, { label: "Name", okText: "Save" });
    if (!name) return;
    const wf = this.serialize();
    if (this.workflowsPanel.available) {
      try {
        await this.api.saveWorkflowFile(name, wf);
        this.setName(name);
        this.markClean();
        toast(`Saved ${name}`, "success");
        this.workflowsPanel.refresh();
        return;
      } catch (e) {
        if (!(e instanceof HttpError) || (e.status !== 404 && e.status !== 405)) {
          toast(`Save failed: ${errText(e)}`, "error");
          return;
        }
        this.workflowsPanel.available = false;
      }
    }
    download(`${name}.json`, JSON.stringify(wf, null, 2));
    this.setName(name);
    this.markClean();
  }

  exportWorkflow(): void {
    download(`${this.workflowName}.json`, JSON.stringify(this.serialize(), null, 2));
  }

  exportApi(): void {
    download(`${this.workflowName}_api.json`, JSON.stringify(graphToApi(this.graph), null, 2));
  }

  /** Keeps the open tabs (the shown one as it is now) in local storage for the next page load. */
  private persist(force = false): void {
    if (!this.activeTab) return;
    const v = this.graph._version + this.canvas.ds.offset[0] + this.canvas.ds.scale * 1e6;
    if (!force && v === this.savedVersion) return;
    this.savedVersion = v;
    const live = this.serialize();
    const data: StoredTabs = {
      active: this.activeTab.id,
      tabs: this.tabs.map((t) => ({ id: t.id, name: t.name, dirty: t.dirty, workflow: t === this.activeTab ? live : t.workflow })),
    };
    try {
      localStorage.setItem(TABS_KEY, JSON.stringify(data));
    } catch (e) {
      console.warn("could not keep the workflow in local storage", e);
    }
  }

  // ---------- images ----------

  private pickAndUpload(node: LGraphNode, combo: IBaseWidget): void {
    const input = h("input", { type: "file", accept: "image/png,image/jpeg,image/webp,image/gif,image/bmp" });
    input.onchange = () => {
      const f = input.files?.[0];
      if (f) this.uploadInto(node, combo, f);
    };
    input.click();
  }

  async uploadInto(node: LGraphNode, combo: IBaseWidget, file: File): Promise<void> {
    try {
      const res = await this.api.uploadImage(file, file.name, { type: "input" });
      const value = res.subfolder ? `${res.subfolder}/${res.name}` : res.name;
      const values = (combo.options as any).values as unknown[];
      if (Array.isArray(values) && !values.includes(value)) values.push(value);
      combo.value = value;
      this.onNodeValueChanged(node, combo.name);
      this.graph._version++;
      toast(`Uploaded ${res.name}`, "success", { timeout: 2000 });
    } catch (e) {
      toast(`Upload failed: ${errText(e)}`, "error");
    }
  }

  private onNodeValueChanged(node: LGraphNode, _name?: string): void {
    const hasUpload = node.widgets?.some((w) => w.name === "upload");
    if (!hasUpload) return;
    const combo = node.widgets?.find((w) => w.type === "combo");
    const value = combo?.value;
    if (typeof value !== "string" || !value) return;
    cachedImageUrl(this.api, inputImageRef(value))
      .then((url) => new Promise<HTMLImageElement>((res, rej) => {
        const img = new Image();
        img.onload = () => res(img);
        img.onerror = rej;
        img.src = url;
      }))
      .then((img) => {
        visual(node).images = [img];
        ensureImageRoom(node);
        node.setDirtyCanvas(true, true);
      })
      .catch(() => {
        visual(node).images = undefined;
      });
  }

  // ---------- queue ----------

  async queuePrompt(count = this.batchCount, front = false): Promise<string[]> {
    if (this.queueing) return [];
    this.queueing = true;
    const ids: string[] = [];
    try {
      for (const n of this.graph.nodes) {
        if (visual(n).issues && !(n as any).last_serialization) setIssues(n, undefined);
      }
      for (let i = 0; i < Math.max(1, count); i++) {
        const prompt = graphToApi(this.graph);
        if (!Object.keys(prompt).length) {
          toast("Nothing to run: the graph has no nodes", "warning");
          break;
        }
        const workflow = this.serialize();
        try {
          const res = await this.api.queuePrompt(prompt, workflow, { front });
          ids.push(res.prompt_id);
          this.promptTabs.set(res.prompt_id, this.activeTab.id);
          this.queued.push(res.prompt_id);
          if (res.node_errors && Object.keys(res.node_errors).length) this.showNodeErrors(res.node_errors);
        } catch (e) {
          if (e instanceof PromptError) {
            this.showNodeErrors(e.body.node_errors ?? {});
            toast(`Prompt rejected: ${e.message}`, "error", { details: this.describeErrors(e) });
          } else {
            toast(`Could not queue: ${errText(e)}`, "error");
          }
          break;
        }
        // Seeds change after queueing, so the next run differs and this one is reproducible.
        for (const n of this.graph.nodes) applyControlAfterGenerate(n);
        this.graph.setDirtyCanvas(true, true);
      }
      if (ids.length) toast(ids.length === 1 ? "Queued" : `Queued ${ids.length} prompts`, "success", { timeout: 1500 });
      this.queuePanel.refresh();
    } finally {
      this.queueing = false;
    }
    return ids;
  }

  private describeErrors(e: PromptError): string {
    const err = e.body.error;
    const lines: string[] = [];
    if (typeof err === "object" && err?.details) lines.push(err.details);
    for (const [id, ne] of Object.entries(e.body.node_errors ?? {})) {
      for (const x of ne.errors ?? []) lines.push(`#${id} ${ne.class_type ?? ""}: ${x.message}${x.details ? ` (${x.details})` : ""}`);
    }
    return [...new Set(lines)].slice(0, 12).join("\n");
  }

  showNodeErrors(errors: NodeErrors): void {
    let first: LGraphNode | null = null;
    for (const [id, ne] of Object.entries(errors)) {
      const node = nodeById(this.graph, id);
      if (!node) continue;
      const issues: NodeIssue[] = (ne.errors ?? []).map((x) => ({
        message: x.message,
        details: x.details,
        input: x.extra_info?.input_name,
      }));
      setIssues(node, issues);
      first ??= node;
    }
    if (first && !this.canvas.isNodeVisible(first)) this.canvas.centerOnNode(first);
    this.canvas.setDirty(true, true);
  }

  // ---------- auth ----------

  private askForToken(): Promise<boolean> {
    this.authPrompt ??= promptDialog("Access token required", "", {
      label: "This server requires a token. Paste the token it was started with.",
      password: true,
      okText: "Connect",
    }).then((t) => {
      this.authPrompt = null;
      if (!t) return false;
      setToken(t.trim());
      return true;
    });
    return this.authPrompt;
  }

  // ---------- test hook ----------

  private exposeHook(): void {
    const app = this;
    (window as any).sdflow = {
      app,
      get graph() {
        return app.graph;
      },
      get canvas() {
        return app.canvas;
      },
      LiteGraph,
      api: app.api,
      graphToApi: () => graphToApi(app.graph),
      serialize: () => app.serialize(),
      queue: (n?: number) => app.queuePrompt(n),
      load: (data: unknown, name?: string) => app.loadGraphData(data, name),
      events: () => app.execution?.log ?? [],
      /** Client (page) coordinates of a slot centre, for driving real mouse drags. */
      slotPos(nodeId: number, kind: "input" | "output", index: number): [number, number] {
        const node = app.graph.getNodeById(nodeId);
        if (!node) throw new Error(`no node ${nodeId}`);
        app.canvas.draw(true, true);
        const p = kind === "input" ? node.getInputPos(index) : node.getOutputPos(index);
        return app.graphToClient(p[0], p[1]);
      },
      nodeTitlePos(nodeId: number): [number, number] {
        const node = app.graph.getNodeById(nodeId);
        if (!node) throw new Error(`no node ${nodeId}`);
        app.canvas.draw(true, true); // lay out a node added or loaded in this same task
        return app.graphToClient(node.pos[0] + 40, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2);
      },
      /** Client coordinates of the centre of a widget (x at `fx` of its width). */
      widgetPos(nodeId: number, name: string, fx = 0.5): [number, number] {
        const node = app.graph.getNodeById(nodeId);
        const w = node?.widgets?.find((x) => x.name === name);
        if (!node || !w) throw new Error(`no widget ${name} on ${nodeId}`);
        app.canvas.draw(true, true); // lay out widgets of a node added in this same task
        const h = (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT + 4) - 4;
        return app.graphToClient(node.pos[0] + node.size[0] * fx, node.pos[1] + (w.y ?? 0) + h / 2);
      },
      nodeState(nodeId: number) {
        const node = app.graph.getNodeById(nodeId);
        if (!node) return null;
        const v = visual(node);
        return {
          id: node.id,
          type: node.type,
          title: node.title,
          running: !!v.running,
          progress: v.progress ?? null,
          images: (v.images ?? []).map((i) => ({ w: i.naturalWidth, h: i.naturalHeight })),
          hasPreview: !!v.preview,
          hasErrors: !!node.has_errors,
          issues: v.issues ?? [],
          inputErrors: node.inputs.filter((i) => i.hasErrors).map((i) => i.name),
          widgets: Object.fromEntries((node.widgets ?? []).map((w) => [w.name, w.value])),
        };
      },
      setIssues(nodeId: number, issues: NodeIssue[] | undefined): void {
        const node = app.graph.getNodeById(nodeId);
        if (!node) throw new Error(`no node ${nodeId}`);
        setIssues(node, issues);
      },
      setWidget(nodeId: number, name: string, value: unknown): void {
        const node = app.graph.getNodeById(nodeId);
        const w = node?.widgets?.find((x) => x.name === name);
        if (!node || !w) throw new Error(`no widget ${name} on ${nodeId}`);
        w.value = value as any;
        if (isTextAreaWidget(w)) w.element.dispatchEvent(new Event("input"));
        node.onWidgetChanged?.(name, value, undefined, w);
        app.graph._version++;
        app.canvas.setDirty(true, true);
      },
      lastRefusedLink: () => app.lastRefusedLink,
      /** The workflow as kept in local storage for the next page load. */
      persisted: () => {
        const stored = JSON.parse(localStorage.getItem(TABS_KEY) ?? "null") as StoredTabs | null;
        return stored?.tabs.find((t) => t.id === stored.active)?.workflow ?? null;
      },
      /** The open tabs: id, name, unsaved mark, active. */
      tabs: () => app.tabs.map((t) => ({ id: t.id, name: t.name, dirty: t.dirty, active: t === app.activeTab })),
      /** Ids of the selected nodes. */
      selected: () => [...app.canvas.selectedItems].map((i: any) => i.id).filter((id) => id !== undefined),
      /** Undo and redo stack sizes, with any pending change recorded first. */
      undoDepth() {
        app.undo?.check();
        return app.undo?.depth ?? { undo: 0, redo: 0 };
      },
    };
  }
}

export function installExecution(app: App): void {
  app.execution = new ExecutionTracker(app.api, (id) => app.graphForPrompt(id), {
    onOutputs: (promptId, nodeId, refs, imgs) => app.onOutputs(promptId, nodeId, refs, imgs),
    onProgress: (p) => {
      app.queuePanel.setProgress(p);
      app.setProgress(p.max ? p : null);
    },
    onPromptDone: () => {
      app.setProgress(null);
      if (app.side.active === "gallery") void app.gallery.refresh();
      app.queuePanel.scheduleRefresh();
      app.historyPanel.refresh();
    },
    onQueueChanged: (d) => {
      app.queuePanel.scheduleRefresh();
      const remaining = d?.status?.exec_info?.queue_remaining;
      if (typeof remaining === "number") app.setQueueSize(remaining);
      const paused = d?.status?.exec_info?.paused ?? d?.status?.paused;
      if (typeof paused === "boolean") app.queuePanel.setPaused(paused);
    },
    imageUrl: (ref) => cachedImageUrl(app.api, ref),
  });
  app.api.on("connection", ({ connected }) => {
    app.topbar.setConnected(connected);
    // After a reconnect (e.g. a server restart) the queue may have changed while we were away.
    if (connected) app.queuePanel.scheduleRefresh();
  });
  app.api.on("execution_start", () => app.queuePanel.scheduleRefresh(30));
}
