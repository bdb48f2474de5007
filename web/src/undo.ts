// Undo/redo by snapshots, driven by graph changes: litegraph bumps `graph._version` on every structural
// change (add, remove, connect, widget value, mode, configure), so a watcher on that counter schedules a
// comparison with the last snapshot; moves and resizes end with a pointer-up on the canvas and text
// typed into DOM widgets fires `input`, which schedule the same comparison. Nothing polls: a restore
// cannot be followed by a stray check that finds a late layout change and throws the redo steps away.
// The view (pan/zoom) is not part of a snapshot, so panning is never undone.
import type { LGraph } from "@comfyorg/litegraph";
import type { App } from "./app";

const LIMIT = 60;

type Listener = () => void;
const versionWatchers = new WeakMap<LGraph, Set<Listener>>();

/** Calls `fn` (synchronously) whenever litegraph bumps the graph's change counter. */
export function watchGraphVersion(graph: LGraph, fn: Listener): () => void {
  let set = versionWatchers.get(graph);
  if (!set) {
    const listeners = new Set<Listener>();
    set = listeners;
    versionWatchers.set(graph, listeners);
    let value = graph._version;
    Object.defineProperty(graph, "_version", {
      configurable: true,
      enumerable: true,
      get: () => value,
      set: (v: number) => {
        value = v;
        for (const l of listeners) l();
      },
    });
  }
  set.add(fn);
  return () => set!.delete(fn);
}

export interface HistoryState {
  undo: string[];
  redo: string[];
  current: string;
}

export class UndoHistory {
  private undoStack: string[] = [];
  private redoStack: string[] = [];
  private current = "";
  private dirty = false;
  private scheduled = false;
  private restoring = false;
  private suspended = 0;
  /** Called after every recorded step, undo and redo (the tab bar shows the unsaved mark from it). */
  onChange?: () => void;

  constructor(private app: App) {
    watchGraphVersion(app.graph, () => this.changed());
    const wrap = () => app.canvasEl.parentElement;
    // After litegraph's own handler has finished with the event (it is registered on the canvas,
    // below this capture listener), hence the task rather than a microtask.
    window.addEventListener("pointerup", (e) => {
      if (wrap()?.contains(e.target as Node)) this.changed(true);
    }, true);
    for (const type of ["input", "change"]) {
      window.addEventListener(type, (e) => {
        if (wrap()?.contains(e.target as Node)) this.changed(true);
      }, true);
    }
  }

  private snapshot(): string {
    const wf = this.app.serialize() as any;
    if (wf.extra) delete wf.extra.ds;
    return JSON.stringify(wf);
  }

  /** Something may have changed: compare once the current event is over. */
  changed(afterEvent = false): void {
    if (this.restoring || this.suspended) return;
    this.dirty = true;
    if (this.scheduled) return;
    this.scheduled = true;
    const run = () => {
      this.scheduled = false;
      this.check();
    };
    if (afterEvent) setTimeout(run, 0);
    else queueMicrotask(run);
  }

  /** Runs `fn` without recording its changes as a step (they become part of the current state). */
  quietly<T>(fn: () => T): T {
    this.suspended++;
    try {
      return fn();
    } finally {
      this.suspended--;
      this.current = this.snapshot();
      this.dirty = false;
    }
  }

  /** Starts a fresh history from the current graph. */
  reset(): void {
    this.undoStack = [];
    this.redoStack = [];
    this.current = this.snapshot();
    this.dirty = false;
    this.onChange?.();
  }

  /** The stacks, for keeping a tab's history while another tab is shown. */
  save(): HistoryState {
    this.check();
    return { undo: [...this.undoStack], redo: [...this.redoStack], current: this.current };
  }

  load(state: HistoryState): void {
    this.undoStack = [...state.undo];
    this.redoStack = [...state.redo];
    this.current = this.snapshot();
    this.dirty = false;
  }

  check(): void {
    if (!this.dirty || this.restoring) return;
    // A drag in progress ends with a pointer-up, which checks again.
    if (this.app.canvas?.pointer?.isDown) return;
    this.dirty = false;
    const snap = this.snapshot();
    if (snap === this.current) return;
    if (this.current) this.undoStack.push(this.current);
    if (this.undoStack.length > LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.current = snap;
    this.onChange?.();
  }

  get canUndo(): boolean {
    return this.undoStack.length > 0;
  }

  get canRedo(): boolean {
    return this.redoStack.length > 0;
  }

  /** Sizes of the stacks (the test hook waits on them). */
  get depth(): { undo: number; redo: number } {
    return { undo: this.undoStack.length, redo: this.redoStack.length };
  }

  /** The serialised graph as last recorded. */
  get state(): string {
    return this.current;
  }

  undo(): boolean {
    this.check();
    const prev = this.undoStack.pop();
    if (prev === undefined) return false;
    this.redoStack.push(this.current);
    this.restore(prev);
    return true;
  }

  redo(): boolean {
    this.check();
    const next = this.redoStack.pop();
    if (next === undefined) return false;
    this.undoStack.push(this.current);
    this.restore(next);
    return true;
  }

  private restore(snap: string): void {
    this.restoring = true;
    try {
      this.app.restoreSnapshot(JSON.parse(snap));
      // Compare later changes with the graph as loaded (loading may normalise details of the snapshot).
      this.current = this.snapshot();
      this.dirty = false;
    } finally {
      this.restoring = false;
    }
    this.onChange?.();
  }
}
