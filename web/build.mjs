// Bundles the editor into dist/: one ES module, one stylesheet, index.html.
import * as esbuild from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

const watch = process.argv.includes("--watch");
const outdir = "dist";

await rm(outdir, { recursive: true, force: true });
await mkdir(outdir, { recursive: true });
await copyFile("src/index.html", `${outdir}/index.html`);

const options = {
  entryPoints: { app: "src/main.ts" },
  bundle: true,
  outdir,
  format: "esm",
  target: "es2022",
  sourcemap: true,
  minify: !watch,
  legalComments: "linked",
  logLevel: "info",
};

if (watch) {
  const ctx = await esbuild.context(options);
  await ctx.watch();
} else {
  await esbuild.build(options);
}
