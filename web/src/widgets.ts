// Widgets for widget inputs (INT, FLOAT, STRING, BOOLEAN, combos), the seed's
// control_after_generate companion and LoadImage's upload button.
//
// Layout of widgets (and so of `widgets_values`) follows ComfyUI: one widget per widget input in
// declared order, the control value right after its input, and the upload button after its combo.
import type { LGraphNode } from "@comfyorg/litegraph";
import type { IBaseWidget } from "./lgtypes";
import { addTextAreaWidget } from "./domwidgets";
import { hasControlAfterGenerate, type ParsedInput } from "./schema";

export const CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"] as const;
export type ControlMode = (typeof CONTROL_MODES)[number];
export const CONTROL_WIDGET_NAME = "control_after_generate";
/** JS numbers are exact only up to 2^53 - 1: seeds above that would be silently changed. */
export const MAX_SAFE_SEED = Number.MAX_SAFE_INTEGER;

/** Hooks the widgets need from the application (uploads, previews, change notifications). */
export interface WidgetHost {
  uploadImage(node: LGraphNode, combo: IBaseWidget): void;
  widgetChanged(node: LGraphNode, widget: IBaseWidget): void;
}

let host: WidgetHost | null = null;
export function setWidgetHost(h: WidgetHost): void {
  host = h;
}

export interface SdWidgetExtras {
  /** The input this widget edits (absent for control and upload widgets). */
  sdInput?: ParsedInput;
  /** control_after_generate widget attached to this one. */
  sdControl?: IBaseWidget;
  /** For a control widget: the widget it drives. */
  sdTarget?: IBaseWidget;
}

export function extras(w: IBaseWidget): SdWidgetExtras {
  return w as unknown as SdWidgetExtras;
}

function decimals(x: number): number {
  const s = String(x);
  if (s.includes("e-")) return Number(s.split("e-")[1]);
  const i = s.indexOf(".");
  return i < 0 ? 0 : s.length - i - 1;
}

function numberOptions(input: ParsedInput) {
  const o = input.options;
  const isInt = input.widget === "INT";
  const step = typeof o.step === "number" && o.step > 0 ? o.step : isInt ? 1 : 0.1;
  let round: number | undefined;
  if (isInt) round = Math.max(1, Math.round(step));
  else if (typeof o.round === "number" && o.round > 0) round = o.round;
  const precision = isInt ? 0 : Math.min(6, Math.max(decimals(round ?? step), 1));
  let max = typeof o.max === "number" ? o.max : undefined;
  let min = typeof o.min === "number" ? o.min : undefined;
  // Past 2^53 every number is a guess: cap ranges to what the widget can hold exactly.
  if (isInt && max !== undefined && max > MAX_SAFE_SEED) max = MAX_SAFE_SEED;
  if (isInt && min !== undefined && min < -MAX_SAFE_SEED) min = -MAX_SAFE_SEED;
  // litegraph's legacy `step` is ten times the increment; `step2` is the real one.
  return { min, max, step: step * 10, step2: step, precision, round };
}

function defaultNumber(input: ParsedInput, min?: number, max?: number): number {
  let v = typeof input.options.default === "number" ? input.options.default : min ?? 0;
  if (min !== undefined && v < min) v = min;
  if (max !== undefined && v > max) v = max;
  return v;
}

/** Creates the widget(s) for one widget input. Returns the main widget. */
export function addInputWidget(node: LGraphNode, input: ParsedInput): IBaseWidget {
  const o = input.options;
  const changed = (w: IBaseWidget) => host?.widgetChanged(node, w);
  let widget: IBaseWidget;
  switch (input.widget) {
    case "INT":
    case "FLOAT": {
      const opts = numberOptions(input);
      const w = node.addWidget("number", input.name, defaultNumber(input, opts.min, opts.max), (v: number) => {
        // Snap to the input's granularity, as the server validates exact values.
        let nv = Number(v);
        if (opts.round) nv = Math.round(nv / opts.round) * opts.round;
        if (input.widget === "FLOAT") nv = Number(nv.toFixed(opts.precision));
        if (opts.min !== undefined && nv < opts.min) nv = opts.min;
        if (opts.max !== undefined && nv > opts.max) nv = opts.max;
        w.value = nv;
        changed(w);
      }, { min: opts.min, max: opts.max, step: opts.step, step2: opts.step2, precision: opts.precision });
      widget = w;
      break;
    }
    case "BOOLEAN": {
      const w = node.addWidget("toggle", input.name, o.default === undefined ? false : !!o.default, () => changed(w), {
        on: o.label_on ?? "true",
        off: o.label_off ?? "false",
      });
      widget = w;
      break;
    }
    case "STRING": {
      const dflt = o.default === undefined ? "" : String(o.default);
      if (o.multiline) {
        const w = addTextAreaWidget(node, input.name, dflt, { placeholder: o.placeholder, onChange: () => changed(w) });
        widget = w;
      } else {
        const w = node.addWidget("text", input.name, dflt, () => changed(w), {});
        widget = w;
      }
      break;
    }
    case "COMBO": {
      const values = (input.values ?? []).map((v) => (typeof v === "string" || typeof v === "number" ? v : String(v)));
      const dflt = o.default !== undefined && values.includes(o.default) ? o.default : values[0] ?? "";
      const w = node.addWidget("combo", input.name, dflt, () => changed(w), { values });
      widget = w;
      break;
    }
    default:
      throw new Error(`not a widget input: ${input.name}`);
  }
  if (input.tooltip) widget.tooltip = input.tooltip;
  extras(widget).sdInput = input;

  if (hasControlAfterGenerate(input)) {
    const control = node.addWidget("combo", CONTROL_WIDGET_NAME, "randomize", () => {}, {
      values: [...CONTROL_MODES],
      // Kept in widgets_values (ComfyUI's layout) but never sent to the server.
      serialize: false,
    } as any);
    control.label = "control after generate";
    control.tooltip = "What happens to the value after each queued run";
    extras(widget).sdControl = control;
    extras(control).sdTarget = widget;
  }

  if (input.widget === "COMBO" && (o.image_upload || o.video_upload)) {
    const upload = node.addWidget("button", "upload", "image", () => host?.uploadImage(node, widget), { serialize: false } as any);
    upload.label = "choose file to upload";
  }
  return widget;
}

/** Random integer in [lo, hi] (inclusive) from 53 random bits. */
function randomInt(lo: number, hi: number): number {
  const buf = new Uint32Array(2);
  crypto.getRandomValues(buf);
  const r = (buf[0] & 0x1fffff) * 2 ** 32 + buf[1]; // 21 + 32 = 53 bits
  const span = hi - lo + 1;
  return lo + (span > MAX_SAFE_SEED ? r : r % span);
}

/** Applies each control_after_generate widget of the node to its target (after a run is queued). */
export function applyControlAfterGenerate(node: LGraphNode): void {
  for (const w of node.widgets ?? []) {
    const control = extras(w).sdControl;
    if (!control) continue;
    const mode = normaliseControlValue(control.value);
    if (mode === "fixed") continue;
    if (w.type === "combo") {
      const values = ((w.options as any).values ?? []) as unknown[];
      if (!values.length) continue;
      let i = values.indexOf(w.value);
      if (mode === "increment") i = (i + 1) % values.length;
      else if (mode === "decrement") i = (i - 1 + values.length) % values.length;
      else i = randomInt(0, values.length - 1);
      w.value = values[i] as any;
      continue;
    }
    const opts = w.options as { min?: number; max?: number; step2?: number };
    const step = opts.step2 ?? 1;
    const min = Math.max(opts.min ?? 0, -MAX_SAFE_SEED);
    const max = Math.min(opts.max ?? MAX_SAFE_SEED, MAX_SAFE_SEED);
    let v = Number(w.value);
    if (mode === "increment") v = v + step > max ? min : v + step;
    else if (mode === "decrement") v = v - step < min ? max : v - step;
    else v = randomInt(Math.max(min, 0), max);
    w.value = v;
  }
}

/**
 * The values to configure a node's widgets with: a save from before an input had its
 * control_after_generate companion lacks the control value, which would shift every later value one
 * widget along. Where the stored values are fewer than the widgets, a control slot whose stored value
 * is no control value gets "fixed" (the loaded graph keeps its seed); saves of today's length pass as
 * they are. Widgets added to the schema since keep their defaults (values shorter at the end).
 */
export function alignLegacyWidgetValues(widgets: IBaseWidget[], values: unknown[]): unknown[] {
  const slots = widgets.filter((w) => w && w.serialize !== false);
  const isControl = (w: IBaseWidget) => w.name === CONTROL_WIDGET_NAME && !!extras(w).sdTarget;
  if (values.length >= slots.length || !slots.some(isControl)) return values;
  const out: unknown[] = [];
  let j = 0;
  for (const w of slots) {
    if (j >= values.length) break;
    const v = values[j];
    if (isControl(w) && typeof v !== "boolean" && !(CONTROL_MODES as readonly unknown[]).includes(v)) {
      out.push("fixed");
      continue;
    }
    out.push(v);
    j++;
  }
  return out.concat(values.slice(j));
}

/** Old workflows store a boolean in the control slot. */
export function normaliseControlValue(v: unknown): ControlMode {
  if (v === true) return "randomize";
  if (v === false || v == null) return "fixed";
  return (CONTROL_MODES as readonly string[]).includes(String(v)) ? (v as ControlMode) : "fixed";
}
