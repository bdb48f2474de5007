// Node schemas as served by GET /api/object_info, and their normalised form.
// The editor knows nothing about a node beyond what this endpoint says.

export type InputOptions = Record<string, any>;
/** `[TYPE, options?]` where TYPE is a type name or (classic combos) the list of allowed values. */
export type InputSpec = [string | unknown[], InputOptions?] | [string | unknown[]];

export interface NodeDef {
  name: string;
  display_name?: string;
  description?: string;
  category?: string;
  python_module?: string;
  input: {
    required?: Record<string, InputSpec>;
    optional?: Record<string, InputSpec>;
    hidden?: Record<string, unknown>;
  };
  input_order?: { required?: string[]; optional?: string[] };
  output: string[];
  output_is_list?: boolean[];
  output_name?: string[];
  output_tooltips?: string[];
  output_node?: boolean;
  deprecated?: boolean;
  experimental?: boolean;
}

export type ObjectInfo = Record<string, NodeDef>;

export type WidgetKind = "INT" | "FLOAT" | "STRING" | "BOOLEAN" | "COMBO";
export const WIDGET_KINDS: ReadonlySet<string> = new Set(["INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"]);

export interface ParsedInput {
  name: string;
  optional: boolean;
  /** Socket type for a link: the wire type name, or the widget kind for widget inputs. */
  type: string;
  /** Set when the input is edited with a widget. */
  widget?: WidgetKind;
  options: InputOptions;
  /** Allowed values of a combo. */
  values?: unknown[];
  tooltip?: string;
}

/** Names ComfyUI gives a control_after_generate widget even without the option. */
const SEED_NAMES = new Set(["seed", "noise_seed"]);

export function parseInput(name: string, spec: InputSpec, optional: boolean): ParsedInput {
  const [rawType, rawOptions] = spec;
  const options: InputOptions = { ...(rawOptions ?? {}) };
  const tooltip = typeof options.tooltip === "string" ? options.tooltip : undefined;
  if (Array.isArray(rawType)) {
    return { name, optional, type: "COMBO", widget: "COMBO", options, values: rawType, tooltip };
  }
  const type = String(rawType);
  if (type === "COMBO") {
    const values = Array.isArray(options.options) ? options.options : Array.isArray(options.values) ? options.values : [];
    return { name, optional, type: "COMBO", widget: "COMBO", options, values, tooltip };
  }
  if (WIDGET_KINDS.has(type) && !options.forceInput) {
    return { name, optional, type, widget: type as WidgetKind, options, tooltip };
  }
  return { name, optional, type, options, tooltip };
}

/** Inputs of a node in declared order: required first, then optional (hidden ones are the executor's). */
export function nodeInputs(def: NodeDef): ParsedInput[] {
  const out: ParsedInput[] = [];
  for (const group of ["required", "optional"] as const) {
    const specs = def.input?.[group] ?? {};
    const order = def.input_order?.[group] ?? Object.keys(specs);
    const seen = new Set<string>();
    for (const name of [...order, ...Object.keys(specs)]) {
      if (seen.has(name) || !(name in specs)) continue;
      seen.add(name);
      out.push(parseInput(name, specs[name], group === "optional"));
    }
  }
  return out;
}

export function hasControlAfterGenerate(input: ParsedInput): boolean {
  if (input.widget !== "INT" && input.widget !== "COMBO") return false;
  if (input.options.control_after_generate !== undefined) return !!input.options.control_after_generate;
  return input.widget === "INT" && SEED_NAMES.has(input.name);
}

/**
 * The title a node is shown with everywhere (canvas, search, library): the server's display name, or,
 * where the server gives only the class name, that name in words ("EmptyLatentImage" → "Empty Latent
 * Image", "VAEDecode" → "VAE Decode"); a single capital prefix stays joined ("KSampler").
 */
export function displayName(def: NodeDef): string {
  if (def.display_name && def.display_name !== def.name) return def.display_name;
  return humanize(def.name);
}

export function humanize(name: string): string {
  if (!/^[A-Za-z0-9]+$/.test(name)) return name;
  return name
    .replace(/([a-z0-9])([A-Z])/g, "$1 $2")
    .replace(/([A-Z]{2,})([A-Z][a-z])/g, "$1 $2");
}

export interface OutputSlotDef {
  name: string;
  type: string;
  isList: boolean;
  tooltip?: string;
}

export function nodeOutputs(def: NodeDef): OutputSlotDef[] {
  return (def.output ?? []).map((rawType, i) => {
    const type = Array.isArray(rawType) ? "COMBO" : String(rawType);
    return {
      name: def.output_name?.[i] ?? type,
      type,
      isList: !!def.output_is_list?.[i],
      tooltip: def.output_tooltips?.[i],
    };
  });
}

/** Do two link types connect? Comma-separated unions intersect; "*" matches anything. */
export function typesCompatible(outputType: string, inputType: string): boolean {
  if (!outputType || !inputType || outputType === "*" || inputType === "*") return true;
  const a = outputType.split(",").map((s) => s.trim());
  const b = new Set(inputType.split(",").map((s) => s.trim()));
  return a.some((t) => t === "*" || b.has(t) || b.has("*"));
}
