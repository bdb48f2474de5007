// Side-panel views of the server's queue (running + pending, cancel, clear, interrupt, pause)
// and of its history (outputs, status, load the workflow a result came from).
import type { Api, HistoryEntry, ImageRef, QueueItem, QueueState } from "../api";
import { clear, h, icon } from "./dom";
import { toast } from "./toast";

export interface QueueActions {
  loadWorkflow(data: unknown, name: string): void;
  nodeTitle(nodeId: string): string | undefined;
}

function shortId(id: string): string {
  return id.length > 8 ? id.slice(0, 8) : id;
}

function errMsg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export class Lightbox {
  static show(url: string, caption: string): void {
    const box = h("div", { class: "lightbox", onclick: () => box.remove() },
      h("img", { src: url, alt: caption }),
      h("div", { class: "lightbox-caption" }, caption));
    const onKey = (e: KeyboardEvent) => {
      if (e.key === "Escape") {
        box.remove();
        document.removeEventListener("keydown", onKey, true);
      }
    };
    document.addEventListener("keydown", onKey, true);
    document.body.append(box);
  }
}

/** Object URLs of fetched images, so re-rendering the panels does not refetch. */
const imageCache = new Map<string, Promise<string>>();

export function cachedImageUrl(api: Api, ref: ImageRef): Promise<string> {
  const key = `${ref.type ?? "output"}/${ref.subfolder ?? ""}/${ref.filename}`;
  let p = imageCache.get(key);
  if (!p) {
    p = api.fetchImageUrl(ref);
    p.catch(() => imageCache.delete(key));
    imageCache.set(key, p);
  }
  return p;
}

export class QueuePanel {
  readonly el: HTMLElement;
  private list: HTMLElement;
  private pauseBtn: HTMLButtonElement;
  private state: QueueState = { queue_running: [], queue_pending: [] };
  private paused = false;
  private pauseSupported = true;
  private progress: { promptId?: string; node?: string; value?: number; max?: number } = {};
  private refreshTimer = 0;
  onCountChange: ((running: number, pending: number) => void) | null = null;

  constructor(private api: Api, private actions: QueueActions) {
    this.pauseBtn = h("button", { class: "btn btn-sm", title: "Pause or resume the queue", onclick: () => this.togglePause() }, icon("pause"), "Pause");
    const head = h("div", { class: "panel-actions" },
      h("button", { class: "btn btn-sm", title: "Stop the running prompt", onclick: () => this.interrupt() }, icon("stop"), "Interrupt"),
      this.pauseBtn,
      h("button", { class: "btn btn-sm", title: "Remove every pending prompt", onclick: () => this.clearQueue() }, icon("trash"), "Clear"));
    this.list = h("div", { class: "queue-list" });
    this.el = h("div", { class: "queue-panel" }, head, this.list);
    this.render();
  }

  /** Debounced: websocket status events arrive in bursts. */
  scheduleRefresh(delay = 120): void {
    window.clearTimeout(this.refreshTimer);
    this.refreshTimer = window.setTimeout(() => this.refresh(), delay);
  }

  async refresh(): Promise<void> {
    try {
      this.state = await this.api.getQueue();
      if (typeof this.state.paused === "boolean") this.paused = this.state.paused;
    } catch (e) {
      console.warn("queue refresh failed", e);
      return;
    }
    this.render();
  }

  setPaused(paused: boolean): void {
    this.paused = paused;
    this.renderPause();
  }

  setProgress(p: { promptId?: string; node?: string; value?: number; max?: number }): void {
    this.progress = p;
    const bar = this.list.querySelector<HTMLElement>(".queue-item.running .bar > span");
    const label = this.list.querySelector<HTMLElement>(".queue-item.running .queue-item-status");
    if (bar && p.max) bar.style.width = `${Math.round((100 * (p.value ?? 0)) / p.max)}%`;
    if (label) label.textContent = this.runningLabel();
  }

  private runningLabel(): string {
    const p = this.progress;
    const title = p.node ? this.actions.nodeTitle(p.node) ?? `#${p.node}` : "";
    const steps = p.max ? ` ${p.value ?? 0}/${p.max}` : "";
    return `Running${title ? ` · ${title}` : ""}${steps}`;
  }

  private renderPause(): void {
    this.pauseBtn.replaceChildren(icon(this.paused ? "play" : "pause"), this.paused ? "Resume" : "Pause");
    this.pauseBtn.classList.toggle("active", this.paused);
    this.pauseBtn.disabled = !this.pauseSupported;
    this.el.classList.toggle("paused", this.paused);
  }

  private render(): void {
    this.renderPause();
    clear(this.list);
    const { queue_running: running, queue_pending: pending } = this.state;
    this.onCountChange?.(running.length, pending.length);
    if (this.paused) this.list.append(h("div", { class: "notice" }, "Queue paused: pending prompts wait until you resume."));
    if (!running.length && !pending.length) {
      this.list.append(h("div", { class: "empty" }, "The queue is empty. Press Queue (Ctrl+Enter) to run the graph."));
      return;
    }
    for (const item of running) this.list.append(this.itemEl(item, true));
    const sorted = [...pending].sort((a, b) => a[0] - b[0]);
    for (const item of sorted) this.list.append(this.itemEl(item, false));
  }

  private itemEl(item: QueueItem, running: boolean): HTMLElement {
    const [number, id, prompt] = item;
    const nodes = Object.keys(prompt ?? {}).length;
    const pct = running && this.progress.promptId === id && this.progress.max ? (100 * (this.progress.value ?? 0)) / this.progress.max : 0;
    return h("div", { class: `queue-item${running ? " running" : ""}`, dataset: { promptId: id } },
      h("div", { class: "queue-item-head" },
        h("span", { class: "queue-num" }, `#${number}`),
        h("span", { class: "queue-id", title: id }, shortId(id)),
        h("span", { class: "queue-meta" }, `${nodes} nodes`),
        running
          ? h("button", { class: "icon-btn", title: "Interrupt", onclick: () => this.interrupt(id) }, icon("stop"))
          : h("button", { class: "icon-btn", title: "Cancel", onclick: () => this.cancel(id) }, icon("x"))),
      h("div", { class: "queue-item-status" }, running ? this.runningLabel() : "Pending"),
      running ? h("div", { class: "bar" }, h("span", { style: { width: `${pct}%` } })) : null);
  }

  async cancel(id: string): Promise<void> {
    try {
      await this.api.deleteQueueItems([id]);
      toast(`Cancelled ${shortId(id)}`, "info");
    } catch (e) {
      toast(`Could not cancel: ${errMsg(e)}`, "error");
    }
    this.refresh();
  }

  async interrupt(id?: string): Promise<void> {
    try {
      await this.api.interrupt(id);
      toast("Interrupt requested", "info");
    } catch (e) {
      toast(`Interrupt failed: ${errMsg(e)}`, "error");
    }
  }

  async clearQueue(): Promise<void> {
    try {
      await this.api.clearQueue();
      toast("Pending prompts cleared", "info");
    } catch (e) {
      toast(`Clear failed: ${errMsg(e)}`, "error");
    }
    this.refresh();
  }

  async togglePause(): Promise<void> {
    const next = !this.paused;
    try {
      await this.api.setPaused(next);
      this.paused = next;
      toast(next ? "Queue paused" : "Queue resumed", "info");
    } catch (e) {
      const status = (e as any)?.status;
      if (status === 404 || status === 405) {
        this.pauseSupported = false;
        toast("This server cannot pause its queue", "warning");
      } else toast(`Pause failed: ${errMsg(e)}`, "error");
    }
    this.render();
    this.refresh();
  }
}

function entryTime(entry: HistoryEntry): number | undefined {
  for (const [type, data] of entry.status?.messages ?? []) {
    if (type === "execution_start" && typeof data?.timestamp === "number") return data.timestamp;
  }
  return undefined;
}

function entryStatus(entry: HistoryEntry): string {
  const msgs = entry.status?.messages ?? [];
  if (msgs.some(([t]) => t === "execution_interrupted")) return "interrupted";
  return entry.status?.status_str ?? (entry.status?.completed ? "success" : "unknown");
}

function relativeTime(ms: number): string {
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(ms).toLocaleString();
}

export class HistoryPanel {
  readonly el: HTMLElement;
  private list: HTMLElement;

  constructor(private api: Api, private actions: QueueActions) {
    const head = h("div", { class: "panel-actions" },
      h("button", { class: "btn btn-sm", onclick: () => this.refresh() }, icon("refresh"), "Refresh"),
      h("button", { class: "btn btn-sm", onclick: () => this.clearAll() }, icon("trash"), "Clear history"));
    this.list = h("div", { class: "history-list" });
    this.el = h("div", { class: "history-panel" }, head, this.list);
  }

  async refresh(): Promise<void> {
    let data: Record<string, HistoryEntry>;
    try {
      data = await this.api.getHistory(64);
    } catch (e) {
      clear(this.list);
      this.list.append(h("div", { class: "empty" }, `History unavailable: ${errMsg(e)}`));
      return;
    }
    clear(this.list);
    const entries = Object.entries(data ?? {}).reverse();
    if (!entries.length) {
      this.list.append(h("div", { class: "empty" }, "No finished prompts yet."));
      return;
    }
    for (const [id, entry] of entries) this.list.append(this.entryEl(id, entry));
  }

  private entryEl(id: string, entry: HistoryEntry): HTMLElement {
    const status = entryStatus(entry);
    const t = entryTime(entry);
    const images: ImageRef[] = [];
    for (const out of Object.values(entry.outputs ?? {})) {
      for (const img of (out?.images ?? []) as ImageRef[]) images.push(img);
    }
    const thumbs = h("div", { class: "thumbs" });
    for (const ref of images.slice(0, 8)) {
      const img = h("img", { class: "thumb", alt: ref.filename, title: ref.filename });
      cachedImageUrl(this.api, ref).then((url) => {
        img.src = url;
        img.onclick = () => Lightbox.show(url, ref.filename);
      }).catch(() => img.classList.add("broken"));
      thumbs.append(img);
    }
    return h("div", { class: `history-item status-${status}`, dataset: { promptId: id } },
      h("div", { class: "queue-item-head" },
        h("span", { class: `status-dot ${status}`, title: status }),
        h("span", { class: "queue-num" }, `#${entry.prompt?.[0] ?? ""}`),
        h("span", { class: "queue-id", title: id }, shortId(id)),
        h("span", { class: "queue-meta" }, t ? relativeTime(t) : status),
        h("button", { class: "icon-btn", title: "Load this workflow", onclick: () => this.load(id, entry) }, icon("open")),
        h("button", { class: "icon-btn", title: "Delete from history", onclick: () => this.remove(id) }, icon("trash"))),
      images.length ? thumbs : h("div", { class: "queue-item-status" }, status === "error" ? "Failed" : status === "interrupted" ? "Interrupted" : "No images"));
  }

  private load(id: string, entry: HistoryEntry): void {
    const extra = entry.prompt?.[3] ?? {};
    const wf = extra?.extra_pnginfo?.workflow;
    this.actions.loadWorkflow(wf ?? entry.prompt?.[2], `history ${shortId(id)}`);
  }

  private async remove(id: string): Promise<void> {
    try {
      await this.api.deleteHistory([id]);
    } catch (e) {
      toast(`Delete failed: ${errMsg(e)}`, "error");
    }
    this.refresh();
  }

  private async clearAll(): Promise<void> {
    try {
      await this.api.clearHistory();
    } catch (e) {
      toast(`Clear failed: ${errMsg(e)}`, "error");
    }
    this.refresh();
  }
}
