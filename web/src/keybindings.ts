// Commands and the keys bound to them. Bindings the user changed are kept in the server's settings
// under ComfyUI's ids (`Comfy.Keybinding.NewBindings` / `Comfy.Keybinding.UnsetBindings`, entries
// `{commandId, combo: {key, ctrl, alt, shift}}`), so they follow the user from browser to browser.
export interface KeyCombo {
  key: string;
  ctrl?: boolean;
  alt?: boolean;
  shift?: boolean;
}

export interface Command {
  id: string;
  label: string;
  run: () => void;
  /** Also runs while a text field has the focus (Ctrl+Enter, Ctrl+S…). */
  global?: boolean;
}

export interface Keybinding {
  commandId: string;
  combo: KeyCombo;
}

export const NEW_BINDINGS = "Comfy.Keybinding.NewBindings";
export const UNSET_BINDINGS = "Comfy.Keybinding.UnsetBindings";

function normKey(key: string): string {
  return key.length === 1 ? key.toLowerCase() : key;
}

export function comboOf(e: KeyboardEvent): KeyCombo {
  return { key: normKey(e.key), ctrl: e.ctrlKey || e.metaKey, alt: e.altKey, shift: e.shiftKey };
}

export function sameCombo(a: KeyCombo, b: KeyCombo): boolean {
  return normKey(a.key) === normKey(b.key) && !!a.ctrl === !!b.ctrl && !!a.alt === !!b.alt && !!a.shift === !!b.shift;
}

export function comboText(c: KeyCombo): string {
  const k = c.key === " " ? "Space" : c.key.length === 1 ? c.key.toUpperCase() : c.key;
  return [c.ctrl && "Ctrl", c.alt && "Alt", c.shift && "Shift", k].filter(Boolean).join("+");
}

export function isModifierKey(key: string): boolean {
  return key === "Control" || key === "Shift" || key === "Alt" || key === "Meta";
}

function isEditable(t: EventTarget | null): boolean {
  const el = t as HTMLElement | null;
  return !!el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" || el.tagName === "SELECT" || el.isContentEditable);
}

export class Keymap {
  readonly commands = new Map<string, Command>();
  private defaults: Keybinding[] = [];
  private added: Keybinding[] = [];
  private unset: Keybinding[] = [];
  /** While set, the next key press goes here instead of running a command (the settings panel). */
  capture: ((c: KeyCombo | null) => void) | null = null;

  constructor(commands: Command[], defaults: Keybinding[]) {
    for (const c of commands) this.commands.set(c.id, c);
    this.defaults = defaults;
  }

  /** Loads the user's changes (ComfyUI's two settings). */
  configure(added: unknown, unset: unknown): void {
    const valid = (x: any): x is Keybinding => x && typeof x.commandId === "string" && x.combo && typeof x.combo.key === "string";
    this.added = Array.isArray(added) ? added.filter(valid) : [];
    this.unset = Array.isArray(unset) ? unset.filter(valid) : [];
  }

  get userBindings(): { added: Keybinding[]; unset: Keybinding[] } {
    return { added: this.added, unset: this.unset };
  }

  /** Effective bindings: the user's first, then defaults not unset and not taken by the user's. */
  bindings(): Keybinding[] {
    const out = [...this.added];
    for (const d of this.defaults) {
      if (this.unset.some((u) => u.commandId === d.commandId && sameCombo(u.combo, d.combo))) continue;
      if (out.some((b) => sameCombo(b.combo, d.combo))) continue;
      out.push(d);
    }
    return out;
  }

  bindingsOf(commandId: string): Keybinding[] {
    return this.bindings().filter((b) => b.commandId === commandId);
  }

  /** Binds `combo` to the command in place of its current keys. */
  rebind(commandId: string, combo: KeyCombo): void {
    for (const b of this.bindingsOf(commandId)) this.unbindOne(b);
    this.added = this.added.filter((b) => !sameCombo(b.combo, combo));
    this.added.push({ commandId, combo });
  }

  private unbindOne(b: Keybinding): void {
    const i = this.added.findIndex((x) => x.commandId === b.commandId && sameCombo(x.combo, b.combo));
    if (i >= 0) this.added.splice(i, 1);
    else if (!this.unset.some((u) => u.commandId === b.commandId && sameCombo(u.combo, b.combo))) this.unset.push(b);
  }

  resetCommand(commandId: string): void {
    this.added = this.added.filter((b) => b.commandId !== commandId);
    this.unset = this.unset.filter((b) => b.commandId !== commandId);
  }

  /** The document keydown handler. Returns true when a command ran. */
  handle(e: KeyboardEvent): boolean {
    if (this.capture) {
      if (isModifierKey(e.key)) return false;
      e.preventDefault();
      e.stopImmediatePropagation();
      const fn = this.capture;
      this.capture = null;
      // Escape cancels the change rather than binding Escape.
      fn(e.key === "Escape" ? null : comboOf(e));
      return true;
    }
    const combo = comboOf(e);
    const b = this.bindings().find((x) => sameCombo(x.combo, combo));
    if (!b) return false;
    const cmd = this.commands.get(b.commandId);
    if (!cmd) return false;
    if (isEditable(e.target) && !cmd.global) return false;
    e.preventDefault();
    cmd.run();
    return true;
  }
}
