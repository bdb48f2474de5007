// Entry point: styles, token capture, the app, and its keyboard commands.
import "@comfyorg/litegraph/style.css";
import "./styles.css";
import { App } from "./app";
import { captureTokenFromUrl } from "./auth";

captureTokenFromUrl();
const app = new App();

// Keys run the commands they are bound to (Settings ▸ Keybindings changes them).
document.addEventListener("keydown", (e) => {
  app.keymap.handle(e);
}, true);

app.start(document.getElementById("app")!).catch((e) => {
  console.error(e);
  document.body.append(`Editor failed to start: ${e instanceof Error ? e.message : e}`);
});
