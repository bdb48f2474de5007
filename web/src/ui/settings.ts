// The settings dialog: general settings and the editable keybindings, both saved to the server.
import { comboText, NEW_BINDINGS, UNSET_BINDINGS, type Keymap } from "../keybindings";
import { SETTINGS, type Settings } from "../settings";
import { clear, h, icon } from "./dom";
import { toast } from "./toast";

export class SettingsDialog {
  private backdrop: HTMLElement | null = null;

  constructor(private settings: Settings, private keymap: Keymap) {}

  close(): void {
    this.keymap.capture = null;
    this.backdrop?.remove();
    this.backdrop = null;
    document.removeEventListener("keydown", this.onKey, true);
  }

  private onKey = (e: KeyboardEvent) => {
    if (e.key === "Escape" && !this.keymap.capture) {
      e.stopPropagation();
      this.close();
    }
  };

  private async save(id: string, value: unknown): Promise<void> {
    try {
      await this.settings.set(id, value);
    } catch (e) {
      toast(`Setting not saved: ${e instanceof Error ? e.message : e}`, "error");
    }
  }

  show(): void {
    this.close();
    const general = h("div", { class: "settings-list" }, SETTINGS.map((s) => {
      let control: HTMLElement;
      if (s.type === "boolean") {
        const box = h("input", { type: "checkbox", class: "setting-input", checked: !!this.settings.get(s.id) });
        box.addEventListener("change", () => void this.save(s.id, box.checked));
        control = box;
      } else {
        const sel = h("select", { class: "input setting-input" }, (s.options ?? []).map((o, i) =>
          h("option", { value: String(i), selected: o.value === this.settings.get(s.id) }, o.label)));
        sel.addEventListener("change", () => void this.save(s.id, s.options![Number(sel.value)].value));
        control = sel;
      }
      return h("label", { class: "setting-row", dataset: { setting: s.id } },
        h("span", { class: "setting-text" }, h("span", { class: "setting-label" }, s.label), s.help ? h("span", { class: "setting-help" }, s.help) : null),
        control);
    }));
    const keys = h("div", { class: "settings-list keybindings" });
    const renderKeys = () => {
      clear(keys);
      for (const cmd of this.keymap.commands.values()) {
        const bound = this.keymap.bindingsOf(cmd.id);
        const value = h("span", { class: "kbd-list" }, bound.length ? bound.map((b) => h("kbd", {}, comboText(b.combo))) : h("span", { class: "setting-help" }, "none"));
        const change = h("button", {
          class: "btn btn-sm",
          onclick: () => {
            change.textContent = "Press keys…";
            change.classList.add("capturing");
            this.keymap.capture = (combo) => {
              if (combo) {
                this.keymap.rebind(cmd.id, combo);
                void this.saveBindings();
              }
              renderKeys();
            };
          },
        }, "Change");
        const reset = h("button", {
          class: "icon-btn",
          title: "Back to the default keys",
          onclick: () => {
            this.keymap.resetCommand(cmd.id);
            void this.saveBindings();
            renderKeys();
          },
        }, icon("refresh"));
        keys.append(h("div", { class: "setting-row", dataset: { command: cmd.id } },
          h("span", { class: "setting-label" }, cmd.label), value, change, reset));
      }
    };
    renderKeys();
    const box = h("div", { class: "modal modal-settings", role: "dialog", "aria-label": "Settings" },
      h("div", { class: "templates-head" }, h("h2", {}, "Settings"),
        h("span", { class: "setting-help" }, this.settings.stored === "server" ? "Saved on the server" : "Saved in this browser (the server keeps no settings)"),
        h("button", { class: "icon-btn", title: "Close", "aria-label": "Close", onclick: () => this.close() }, icon("x"))),
      h("div", { class: "templates-body" },
        h("h3", { class: "templates-section" }, "General"), general,
        h("h3", { class: "templates-section" }, "Keybindings"), keys));
    this.backdrop = h("div", { class: "modal-backdrop" }, box);
    this.backdrop.addEventListener("pointerdown", (e) => {
      if (e.target === this.backdrop) this.close();
    });
    document.addEventListener("keydown", this.onKey, true);
    document.body.append(this.backdrop);
  }

  private async saveBindings(): Promise<void> {
    const { added, unset } = this.keymap.userBindings;
    await this.save(NEW_BINDINGS, added);
    await this.save(UNSET_BINDINGS, unset);
  }
}
