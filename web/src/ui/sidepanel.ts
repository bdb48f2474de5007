// The right-hand side panel with tabs (queue, history, node library, saved workflows).
import { h } from "./dom";

export interface PanelTab {
  id: string;
  label: string;
  el: HTMLElement;
  onShow?: () => void;
}

export class SidePanel {
  readonly el: HTMLElement;
  private tabs: PanelTab[];
  private buttons = new Map<string, HTMLButtonElement>();
  private body: HTMLElement;
  active = "";

  constructor(tabs: PanelTab[]) {
    this.tabs = tabs;
    const bar = h("div", { class: "tabs", role: "tablist" });
    for (const t of tabs) {
      const b = h("button", { class: "tab", role: "tab", dataset: { tab: t.id }, onclick: () => this.show(t.id) }, t.label);
      this.buttons.set(t.id, b);
      bar.append(b);
    }
    this.body = h("div", { class: "tab-body" });
    this.el = h("aside", { class: "sidepanel" }, bar, this.body);
    const saved = localStorage.getItem("sdflow.panelTab");
    this.show(tabs.some((t) => t.id === saved) ? saved! : tabs[0].id, false);
    if (localStorage.getItem("sdflow.panelHidden") === "1") this.el.classList.add("hidden");
  }

  show(id: string, notify = true): void {
    const tab = this.tabs.find((t) => t.id === id);
    if (!tab) return;
    this.active = id;
    for (const [tid, b] of this.buttons) b.classList.toggle("active", tid === id);
    this.body.replaceChildren(tab.el);
    this.el.classList.remove("hidden");
    localStorage.setItem("sdflow.panelTab", id);
    localStorage.setItem("sdflow.panelHidden", "0");
    if (notify) tab.onShow?.();
  }

  toggle(): void {
    const hidden = this.el.classList.toggle("hidden");
    localStorage.setItem("sdflow.panelHidden", hidden ? "1" : "0");
    if (!hidden) this.tabs.find((t) => t.id === this.active)?.onShow?.();
  }
}
