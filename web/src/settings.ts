// User settings, kept in the server's settings store (ComfyUI's `/settings`: GET → object, POST
// /settings/{id} with the JSON value), so they survive reloads and are shared with ComfyUI's front
// end where the ids are the same. A server without the store falls back to local storage.
import type { Api } from "./api";

export interface SettingDef {
  id: string;
  label: string;
  type: "boolean" | "combo";
  default: unknown;
  options?: { label: string; value: unknown }[];
  help?: string;
}

export const SETTINGS: SettingDef[] = [
  {
    id: "Comfy.LinkRenderMode", label: "Link shape", type: "combo", default: 2,
    options: [{ label: "Spline", value: 2 }, { label: "Linear", value: 1 }, { label: "Straight", value: 0 }],
  },
  { id: "Comfy.Minimap.Visible", label: "Show the minimap", type: "boolean", default: true },
  { id: "sdflow.Canvas.SnapToGrid", label: "Snap nodes to the grid", type: "boolean", default: false },
  {
    id: "sdflow.Workflow.ConfirmReplace", label: "Ask before replacing unsaved work", type: "boolean", default: true,
    help: "Opening a file, a template, a history entry or a dropped PNG over a modified graph asks first.",
  },
];

const LOCAL_KEY = "sdflow.settings";

export class Settings {
  private values: Record<string, unknown> = {};
  private serverStore = true;
  private listeners: ((id: string) => void)[] = [];

  constructor(private api: Api) {}

  async load(): Promise<void> {
    try {
      const res = await this.api.fetchApi("/settings");
      if (!res.ok) throw new Error(String(res.status));
      const body = await res.json();
      this.values = body && typeof body === "object" ? body : {};
    } catch {
      this.serverStore = false;
      try {
        this.values = JSON.parse(localStorage.getItem(LOCAL_KEY) ?? "{}") ?? {};
      } catch {
        this.values = {};
      }
    }
  }

  get stored(): "server" | "browser" {
    return this.serverStore ? "server" : "browser";
  }

  get<T = unknown>(id: string, fallback?: T): T {
    if (id in this.values) return this.values[id] as T;
    const def = SETTINGS.find((s) => s.id === id);
    return (def ? def.default : fallback) as T;
  }

  async set(id: string, value: unknown): Promise<void> {
    this.values[id] = value;
    for (const l of this.listeners) l(id);
    if (this.serverStore) {
      const res = await this.api.fetchApi(`/settings/${encodeURIComponent(id)}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(value),
      });
      if (!res.ok) throw new Error(`the server did not keep ${id}: ${res.status} ${res.statusText}`);
    } else {
      localStorage.setItem(LOCAL_KEY, JSON.stringify(this.values));
    }
  }

  onChange(fn: (id: string) => void): void {
    this.listeners.push(fn);
  }
}
