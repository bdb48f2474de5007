// HTTP and websocket client for the server's ComfyUI-compatible API (plus sdflow's extras).
import { getToken } from "./auth";
import type { ObjectInfo } from "./schema";

export type NodeErrors = Record<string, {
  errors: { type: string; message: string; details?: string; extra_info?: Record<string, any> }[];
  dependent_outputs?: string[];
  class_type?: string;
}>;

export interface PromptErrorBody {
  error: { type: string; message: string; details?: string; extra_info?: Record<string, any> } | string;
  node_errors?: NodeErrors;
}

export interface QueuedPrompt {
  prompt_id: string;
  number: number;
  node_errors: NodeErrors;
}

/** [number, prompt_id, prompt, extra_data, outputs_to_execute] */
export type QueueItem = [number, string, Record<string, any>, Record<string, any>, string[]];

export interface QueueState {
  queue_running: QueueItem[];
  queue_pending: QueueItem[];
  paused?: boolean;
}

export interface ImageRef {
  filename: string;
  subfolder?: string;
  type?: string;
}

export interface HistoryEntry {
  prompt: QueueItem;
  outputs: Record<string, Record<string, any>>;
  status?: { status_str?: string; completed?: boolean; messages?: [string, any][] };
  meta?: Record<string, any>;
}

export class HttpError extends Error {
  constructor(public status: number, public body: any, message: string) {
    super(message);
  }
}

/** A 400 from POST /prompt: the server's `error` and per-node `node_errors`. */
export class PromptError extends Error {
  constructor(public body: PromptErrorBody) {
    const err = body.error;
    super(typeof err === "string" ? err : err?.message || "Prompt rejected");
  }
}

export interface PreviewFrame {
  blob: Blob;
  /** Only with type-4 frames (preview metadata). */
  nodeId?: string;
  promptId?: string;
}

type Listener = (data: any) => void;

/** Directory of the page, so the editor also works behind a reverse proxy under a sub-path. */
function basePath(): string {
  const p = window.location.pathname;
  return p.endsWith("/") ? p : p.slice(0, p.lastIndexOf("/") + 1);
}

function randomId(): string {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class Api {
  readonly clientId: string;
  socket: WebSocket | null = null;
  connected = false;
  /** Called on a 401; resolves true when the user supplied a (new) token worth retrying with. */
  onUnauthorized: (() => Promise<boolean>) | null = null;
  private listeners = new Map<string, Set<Listener>>();
  private reconnectDelay = 500;
  private closedByUs = false;

  constructor() {
    // One id per tab, kept across reloads, so a reload still receives the running prompt's events.
    let id = sessionStorage.getItem("sdflow.clientId");
    if (!id) {
      id = randomId();
      sessionStorage.setItem("sdflow.clientId", id);
    }
    this.clientId = id;
  }

  on(type: string, fn: Listener): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => set!.delete(fn);
  }

  emit(type: string, data?: any): void {
    for (const fn of this.listeners.get(type) ?? []) {
      try {
        fn(data);
      } catch (e) {
        console.error(`listener for ${type} failed`, e);
      }
    }
  }

  url(path: string): string {
    return basePath() + "api" + (path.startsWith("/") ? path : "/" + path);
  }

  async fetchApi(path: string, init: RequestInit = {}, retry = true): Promise<Response> {
    const headers = new Headers(init.headers);
    const token = getToken();
    if (token) headers.set("Authorization", `Bearer ${token}`);
    const res = await fetch(this.url(path), { ...init, headers, cache: "no-store" });
    if (res.status === 401 && retry && this.onUnauthorized) {
      if (await this.onUnauthorized()) {
        this.reconnect();
        return this.fetchApi(path, init, false);
      }
    }
    return res;
  }

  private async json<T>(path: string, init?: RequestInit): Promise<T> {
    const res = await this.fetchApi(path, init);
    const text = await res.text();
    let body: any = undefined;
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch {
      body = text;
    }
    if (!res.ok) {
      const msg = typeof body === "object" && body
        ? (typeof body.error === "string" ? body.error : body.error?.message ?? body.message ?? JSON.stringify(body))
        : String(body || res.statusText);
      throw new HttpError(res.status, body, `${res.status} ${msg}`);
    }
    return body as T;
  }

  private post<T>(path: string, body: unknown): Promise<T> {
    return this.json<T>(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  getObjectInfo(): Promise<ObjectInfo> {
    return this.json<ObjectInfo>("/object_info");
  }

  async queuePrompt(prompt: Record<string, any>, workflow: unknown, opts: { front?: boolean; number?: number } = {}): Promise<QueuedPrompt> {
    const body: Record<string, any> = {
      client_id: this.clientId,
      prompt,
      extra_data: { extra_pnginfo: { workflow } },
    };
    if (opts.front) body.front = true;
    if (opts.number) body.number = opts.number;
    const res = await this.fetchApi("/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await res.text();
    let data: any;
    try {
      data = JSON.parse(text);
    } catch {
      data = { error: text || res.statusText };
    }
    if (res.status === 400) throw new PromptError(data);
    if (!res.ok) throw new HttpError(res.status, data, `${res.status} ${typeof data.error === "string" ? data.error : data.error?.message ?? res.statusText}`);
    return data as QueuedPrompt;
  }

  getQueue(): Promise<QueueState> {
    return this.json<QueueState>("/queue");
  }

  deleteQueueItems(ids: string[]): Promise<unknown> {
    return this.post("/queue", { delete: ids });
  }

  clearQueue(): Promise<unknown> {
    return this.post("/queue", { clear: true });
  }

  setPaused(paused: boolean): Promise<unknown> {
    return this.post("/queue", paused ? { pause: true } : { resume: true });
  }

  interrupt(promptId?: string): Promise<unknown> {
    return this.post("/interrupt", promptId ? { prompt_id: promptId } : {});
  }

  getHistory(maxItems = 50): Promise<Record<string, HistoryEntry>> {
    return this.json(`/history?max_items=${maxItems}&offset=-1`);
  }

  deleteHistory(ids: string[]): Promise<unknown> {
    return this.post("/history", { delete: ids });
  }

  clearHistory(): Promise<unknown> {
    return this.post("/history", { clear: true });
  }

  async uploadImage(file: File | Blob, name: string, opts: { type?: string; subfolder?: string; overwrite?: boolean } = {}): Promise<ImageRef & { name: string }> {
    const form = new FormData();
    form.append("image", file, name);
    form.append("type", opts.type ?? "input");
    if (opts.subfolder) form.append("subfolder", opts.subfolder);
    if (opts.overwrite) form.append("overwrite", "true");
    return this.json("/upload/image", { method: "POST", body: form });
  }

  viewPath(ref: ImageRef): string {
    const q = new URLSearchParams({ filename: ref.filename, type: ref.type ?? "output", subfolder: ref.subfolder ?? "" });
    return `/view?${q.toString()}`;
  }

  /** Fetches an image with the auth header (an <img src> cannot send one) and returns an object URL. */
  async fetchImageUrl(ref: ImageRef): Promise<string> {
    const res = await this.fetchApi(this.viewPath(ref));
    if (!res.ok) throw new HttpError(res.status, null, `${res.status} cannot load ${ref.filename}`);
    return URL.createObjectURL(await res.blob());
  }

  listModelFolders(): Promise<string[]> {
    return this.json("/models");
  }

  listModels(folder: string): Promise<string[]> {
    return this.json(`/models/${encodeURIComponent(folder)}`);
  }

  /** A path outside /api (ComfyUI serves `/templates/...` as static files, without the prefix). */
  async fetchRoot(path: string): Promise<Response> {
    const headers = new Headers();
    const token = getToken();
    if (token) headers.set("Authorization", `Bearer ${token}`);
    return fetch(basePath() + path.replace(/^\//, ""), { headers, cache: "no-store" });
  }

  /** Custom-node example workflows, ComfyUI's shape: {module: [template names]}. */
  listWorkflowTemplates(): Promise<Record<string, string[]>> {
    return this.json("/workflow_templates");
  }

  listWorkflows(): Promise<unknown> {
    return this.json("/workflows");
  }

  loadWorkflowFile(name: string): Promise<unknown> {
    return this.json(`/workflows/${encodeURIComponent(name)}`);
  }

  saveWorkflowFile(name: string, workflow: unknown): Promise<unknown> {
    return this.post(`/workflows/${encodeURIComponent(name)}`, workflow);
  }

  async deleteWorkflowFile(name: string): Promise<unknown> {
    return this.json(`/workflows/${encodeURIComponent(name)}`, { method: "DELETE" });
  }

  // ---- websocket ----

  connect(): void {
    this.closedByUs = false;
    const proto = window.location.protocol === "https:" ? "wss:" : "ws:";
    // extras=sdflow: status messages also carry sdflow's fields (paused); other clients get ComfyUI's only
    const q = new URLSearchParams({ clientId: this.clientId, extras: "sdflow" });
    const token = getToken();
    if (token) q.set("token", token);
    const ws = new WebSocket(`${proto}//${window.location.host}${this.url("/ws")}?${q.toString()}`);
    ws.binaryType = "arraybuffer";
    this.socket = ws;
    ws.addEventListener("open", () => {
      this.connected = true;
      this.reconnectDelay = 500;
      // Must be the first text message for the server to send type-4 previews with node ids.
      ws.send(JSON.stringify({ type: "feature_flags", data: { supports_preview_metadata: true } }));
      this.emit("connection", { connected: true });
    });
    ws.addEventListener("close", () => {
      if (this.socket !== ws) return;
      this.connected = false;
      this.emit("connection", { connected: false });
      if (!this.closedByUs) {
        const delay = this.reconnectDelay;
        this.reconnectDelay = Math.min(this.reconnectDelay * 2, 10000);
        setTimeout(() => {
          if (this.socket === ws) this.connect();
        }, delay);
      }
    });
    ws.addEventListener("message", (ev) => this.onMessage(ev));
  }

  reconnect(): void {
    const old = this.socket;
    this.socket = null;
    old?.close();
    this.connect();
  }

  close(): void {
    this.closedByUs = true;
    this.socket?.close();
  }

  private onMessage(ev: MessageEvent): void {
    if (ev.data instanceof ArrayBuffer) {
      this.onBinary(ev.data);
      return;
    }
    let msg: { type: string; data: any };
    try {
      msg = JSON.parse(ev.data);
    } catch {
      console.warn("unparseable websocket message", ev.data);
      return;
    }
    this.emit(msg.type, msg.data ?? {});
    this.emit("*", msg);
  }

  private onBinary(buf: ArrayBuffer): void {
    if (buf.byteLength < 8) return;
    const view = new DataView(buf);
    const eventType = view.getUint32(0);
    if (eventType === 1) {
      const format = view.getUint32(4);
      const mime = format === 2 ? "image/png" : "image/jpeg";
      this.emit("preview", { blob: new Blob([buf.slice(8)], { type: mime }) } satisfies PreviewFrame);
    } else if (eventType === 4) {
      const metaLen = view.getUint32(4);
      let meta: Record<string, any> = {};
      try {
        meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 8, metaLen)));
      } catch {
        /* keep going without metadata */
      }
      const mime = typeof meta.image_type === "string" ? meta.image_type : "image/jpeg";
      this.emit("preview", {
        blob: new Blob([buf.slice(8 + metaLen)], { type: mime }),
        nodeId: meta.display_node_id ?? meta.node_id,
        promptId: meta.prompt_id,
      } satisfies PreviewFrame);
    } else if (eventType === 3) {
      const idLen = view.getUint32(4);
      const dec = new TextDecoder();
      const nodeId = dec.decode(new Uint8Array(buf, 8, idLen));
      const text = dec.decode(new Uint8Array(buf, 8 + idLen));
      this.emit("progress_text", { nodeId, text });
    }
  }
}
