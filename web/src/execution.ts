// Live execution feedback: websocket events → node outlines, progress, previews, outputs, errors.
import type { LGraph, LGraphNode } from "@comfyorg/litegraph";
import type { Api, ImageRef, PreviewFrame } from "./api";
import { clearRunState, ensureImageRoom, setIssues, visual } from "./nodevisuals";

/** Shows output images on a node (below its widgets, replacing a live preview). */
export function showOutputs(n: LGraphNode, refs: ImageRef[], imgs: HTMLImageElement[]): void {
  const v = visual(n);
  v.images = imgs;
  v.preview = undefined;
  (n as any).sdflowOutputs = refs;
  ensureImageRoom(n);
  n.setDirtyCanvas(true, true);
}
import { toast } from "./ui/toast";

export interface ExecutionListener {
  onProgress(p: { promptId?: string; node?: string; value?: number; max?: number }): void;
  onPromptDone(promptId: string | undefined): void;
  onQueueChanged(data: any): void;
  imageUrl(ref: ImageRef): Promise<string>;
  /** A node's output images arrived (the app keeps them with the tab that queued the prompt). */
  onOutputs(promptId: string | undefined, nodeId: string, refs: ImageRef[], images: HTMLImageElement[]): void;
}

export function nodeById(graph: LGraph, id: unknown): LGraphNode | null {
  if (id === null || id === undefined) return null;
  const s = String(id);
  const n = Number(s);
  return graph.getNodeById(Number.isInteger(n) && String(n) === s ? n : s) ?? graph.getNodeById(s);
}

function loadImage(url: string): Promise<HTMLImageElement> {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`cannot decode ${url}`));
    img.src = url;
  });
}

export class ExecutionTracker {
  promptId: string | undefined;
  runningNode: string | null = null;
  /** Recent events, newest last (the test hook reads them). */
  readonly log: { type: string; data: any; t: number }[] = [];
  private previewUrl: string | null = null;

  /** `graphFor` gives the graph showing a prompt's workflow, or null while its tab is not shown. */
  constructor(api: Api, private graphFor: (promptId: string | undefined) => LGraph | null, private listener: ExecutionListener) {
    api.on("*", (msg) => {
      this.log.push({ type: msg.type, data: msg.data, t: Date.now() });
      if (this.log.length > 500) this.log.splice(0, this.log.length - 500);
    });
    api.on("status", (d) => listener.onQueueChanged(d));
    api.on("execution_start", (d) => this.onStart(d));
    api.on("execution_cached", (d) => this.onCached(d));
    api.on("executing", (d) => this.onExecuting(d));
    api.on("progress", (d) => this.onProgress(d));
    api.on("executed", (d) => this.onExecuted(d));
    api.on("execution_success", (d) => this.onFinished(d?.prompt_id));
    api.on("execution_error", (d) => this.onError(d));
    api.on("execution_interrupted", (d) => this.onInterrupted(d));
    api.on("preview", (f: PreviewFrame) => this.onPreview(f));
  }

  private node(id: unknown, promptId = this.promptId): LGraphNode | null {
    const g = this.graphFor(promptId);
    return g ? nodeById(g, id) : null;
  }

  private redraw(): void {
    this.graphFor(this.promptId)?.setDirtyCanvas(true, true);
  }

  private setRunning(id: string | null): void {
    if (this.runningNode) {
      const prev = this.node(this.runningNode);
      if (prev) clearRunState(prev);
    }
    this.runningNode = id;
    const node = id ? this.node(id) : null;
    if (node) {
      const v = visual(node);
      v.running = true;
      v.progress = undefined;
    }
    this.redraw();
  }

  private onStart(d: any): void {
    this.promptId = d?.prompt_id;
    for (const n of this.graphFor(this.promptId)?.nodes ?? []) {
      clearRunState(n);
      const v = visual(n);
      // Errors from the previous run are stale now; validation issues stay until edited.
      if (v.issues?.some((i) => i.message.startsWith("Execution failed"))) setIssues(n, undefined);
    }
    this.listener.onProgress({ promptId: this.promptId });
  }

  private onCached(d: any): void {
    for (const id of d?.nodes ?? []) {
      const n = this.node(id);
      if (n) visual(n).cached = true;
    }
  }

  private onExecuting(d: any): void {
    const id = d?.display_node ?? d?.node ?? null;
    if (id === null || id === undefined) {
      this.setRunning(null);
      this.onFinished(d?.prompt_id);
      return;
    }
    this.setRunning(String(id));
    this.listener.onProgress({ promptId: d?.prompt_id, node: String(id) });
  }

  private onProgress(d: any): void {
    const id = d?.node != null ? String(d.node) : this.runningNode;
    const n = id ? this.node(id) : null;
    if (n && d?.max) {
      const v = visual(n);
      v.running = true;
      v.progress = d.value / d.max;
      n.setDirtyCanvas(true, false);
    }
    this.listener.onProgress({ promptId: d?.prompt_id, node: id ?? undefined, value: d?.value, max: d?.max });
  }

  private async onExecuted(d: any): Promise<void> {
    const id = d?.display_node ?? d?.node;
    const images: ImageRef[] = d?.output?.images ?? [];
    if (id == null || !images.length) return;
    const promptId: string | undefined = d?.prompt_id ?? this.promptId;
    try {
      const urls = await Promise.all(images.map((ref) => this.listener.imageUrl(ref)));
      const imgs = await Promise.all(urls.map(loadImage));
      this.listener.onOutputs(promptId, String(id), images, imgs);
    } catch (e) {
      console.warn("could not show output images", e);
    }
  }

  private onFinished(promptId: string | undefined): void {
    if (promptId && this.promptId && promptId !== this.promptId) return;
    this.setRunning(null);
    this.listener.onPromptDone(promptId);
  }

  private onError(d: any): void {
    const n = this.node(d?.node_id);
    const msg = `${d?.exception_type ?? "Error"}: ${d?.exception_message ?? "execution failed"}`;
    if (n) setIssues(n, [{ message: `Execution failed — ${msg}` }]);
    const tb = Array.isArray(d?.traceback) ? d.traceback.join("").trim().split("\n").slice(-6).join("\n") : undefined;
    toast(`${d?.node_type ?? "Node"} #${d?.node_id ?? "?"} failed: ${d?.exception_message ?? msg}`, "error", { details: tb });
    this.setRunning(null);
    this.listener.onPromptDone(d?.prompt_id);
  }

  private onInterrupted(d: any): void {
    toast(`Interrupted${d?.node_type ? ` at ${d.node_type} #${d.node_id}` : ""}`, "warning");
    this.setRunning(null);
    this.listener.onPromptDone(d?.prompt_id);
  }

  private async onPreview(f: PreviewFrame): Promise<void> {
    const id = f.nodeId ?? this.runningNode;
    const n = id ? this.node(id) : null;
    if (!n) return;
    const url = URL.createObjectURL(f.blob);
    try {
      const img = await loadImage(url);
      const v = visual(n);
      v.preview = img;
      // A fresh run replaces old outputs with the live preview.
      if (v.running) v.images = undefined;
      if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
      this.previewUrl = url;
      ensureImageRoom(n);
      n.setDirtyCanvas(true, true);
    } catch {
      URL.revokeObjectURL(url);
    }
  }
}
