// Undo/redo by snapshots: after each user action (pointer up, key up, text input) or graph change,
// the workflow is serialised and compared with the last snapshot; a difference becomes an undo step.
// The view (pan/zoom) is not part of a snapshot, so panning is never undone.
import type { App } from "./app";

const LIMIT = 60;

export class UndoHistory {
  private undoStack: string[] = [];
  private redoStack: string[] = [];
  private current = "";
  private lastVersion = -1;
  private pending = true;

  constructor(private app: App) {
    const mark = () => (this.pending = true);
    window.addEventListener("pointerup", mark, true);
    window.addEventListener("keyup", mark, true);
    window.addEventListener("input", mark, true);
    setInterval(() => this.check(), 300);
  }

  private snapshot(): string {
    const wf = this.app.serialize() as any;
    if (wf.extra) delete wf.extra.ds;
    return JSON.stringify(wf);
  }

  /** Starts a fresh history from the current graph (used at start-up). */
  reset(): void {
    this.undoStack = [];
    this.redoStack = [];
    this.current = this.snapshot();
    this.lastVersion = this.app.graph._version;
    this.pending = false;
  }

  check(): void {
    const version = this.app.graph._version;
    if (!this.pending && version === this.lastVersion) return;
    if (this.app.canvas?.pointer?.isDown) return; // wait for the end of a drag
    this.pending = false;
    this.lastVersion = version;
    const snap = this.snapshot();
    if (snap === this.current) return;
    if (this.current) this.undoStack.push(this.current);
    if (this.undoStack.length > LIMIT) this.undoStack.shift();
    this.redoStack = [];
    this.current = snap;
  }

  get canUndo(): boolean {
    return this.undoStack.length > 0;
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
    this.app.loadGraphData(JSON.parse(snap), this.app.workflowName, { quiet: true, keepView: true, keepViewAlways: true });
    // Compare later changes with the graph as loaded (loading may normalise details of the snapshot).
    this.current = this.snapshot();
    this.lastVersion = this.app.graph._version;
    this.pending = false;
  }
}
