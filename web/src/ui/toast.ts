// Transient notifications in the bottom-right corner.
import { h, icon } from "./dom";

export type ToastKind = "info" | "success" | "error" | "warning";

let host: HTMLElement | null = null;

function container(): HTMLElement {
  if (!host || !host.isConnected) {
    host = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
    document.body.append(host);
  }
  return host;
}

export function toast(message: string, kind: ToastKind = "info", opts: { details?: string; timeout?: number } = {}): HTMLElement {
  const timeout = opts.timeout ?? (kind === "error" ? 12000 : 4500);
  const close = h("button", { class: "toast-close", title: "Dismiss", onclick: () => el.remove() }, icon("x"));
  const el = h("div", { class: `toast toast-${kind}`, dataset: { kind } },
    h("div", { class: "toast-body" },
      h("div", { class: "toast-msg" }, message),
      opts.details ? h("pre", { class: "toast-details" }, opts.details) : null),
    close);
  container().append(el);
  // Keep the stack short: the oldest goes first.
  const all = container().querySelectorAll(".toast");
  if (all.length > 5) all[0].remove();
  if (timeout > 0) {
    let timer = window.setTimeout(() => el.remove(), timeout);
    el.addEventListener("mouseenter", () => window.clearTimeout(timer));
    el.addEventListener("mouseleave", () => (timer = window.setTimeout(() => el.remove(), 2500)));
  }
  return el;
}
