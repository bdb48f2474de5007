// Small modal dialogs (text prompt, confirm) that match the editor's theme.
import { h } from "./dom";

function modal(content: HTMLElement, onClose: () => void): { close: () => void } {
  const backdrop = h("div", { class: "modal-backdrop" }, content);
  const close = () => {
    backdrop.remove();
    document.removeEventListener("keydown", onKey, true);
  };
  const onKey = (e: KeyboardEvent) => {
    if (e.key === "Escape") {
      e.stopPropagation();
      close();
      onClose();
    }
  };
  backdrop.addEventListener("pointerdown", (e) => {
    if (e.target === backdrop) {
      close();
      onClose();
    }
  });
  document.addEventListener("keydown", onKey, true);
  document.body.append(backdrop);
  return { close };
}

export function promptDialog(title: string, value = "", opts: { label?: string; password?: boolean; okText?: string } = {}): Promise<string | null> {
  return new Promise((resolve) => {
    const input = h("input", { class: "input", type: opts.password ? "password" : "text", value, spellcheck: false });
    const form = h("form", { class: "modal" },
      h("h2", {}, title),
      opts.label ? h("label", { class: "modal-label" }, opts.label) : null,
      input,
      h("div", { class: "modal-actions" },
        h("button", { type: "button", class: "btn", onclick: () => { m.close(); resolve(null); } }, "Cancel"),
        h("button", { type: "submit", class: "btn btn-primary" }, opts.okText ?? "OK")));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      m.close();
      resolve(input.value);
    });
    const m = modal(form, () => resolve(null));
    requestAnimationFrame(() => {
      input.focus();
      input.select();
    });
  });
}

export function infoDialog(title: string, content: HTMLElement): void {
  const box = h("div", { class: "modal modal-wide" },
    h("h2", {}, title),
    content,
    h("div", { class: "modal-actions" },
      h("button", { type: "button", class: "btn", onclick: () => m.close() }, "Close")));
  const m = modal(box, () => {});
}

export function confirmDialog(title: string, message: string, okText = "OK"): Promise<boolean> {
  return new Promise((resolve) => {
    const ok = h("button", { type: "button", class: "btn btn-danger", onclick: () => { m.close(); resolve(true); } }, okText);
    const box = h("div", { class: "modal" },
      h("h2", {}, title),
      h("p", {}, message),
      h("div", { class: "modal-actions" },
        h("button", { type: "button", class: "btn", onclick: () => { m.close(); resolve(false); } }, "Cancel"),
        ok));
    const m = modal(box, () => resolve(false));
    requestAnimationFrame(() => ok.focus());
  });
}

/** A question with several answers (buttons, the last one focused); null when dismissed. */
export function choiceDialog(title: string, message: string, choices: { label: string; value: string; kind?: "primary" | "danger" }[]): Promise<string | null> {
  return new Promise((resolve) => {
    const buttons = choices.map((c) => h("button", {
      type: "button",
      class: `btn${c.kind ? ` btn-${c.kind}` : ""}`,
      dataset: { choice: c.value },
      onclick: () => {
        m.close();
        resolve(c.value);
      },
    }, c.label));
    const box = h("div", { class: "modal", role: "dialog", "aria-label": title },
      h("h2", {}, title),
      h("p", {}, message),
      h("div", { class: "modal-actions" }, buttons));
    const m = modal(box, () => resolve(null));
    requestAnimationFrame(() => buttons[buttons.length - 1]?.focus());
  });
}
