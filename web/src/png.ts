// Reads text metadata from PNG files: tEXt, iTXt (plain or compressed) and zTXt chunks, and the
// non-standard `comf` chunk some tools write. SaveImage stores `prompt` and `workflow` this way.

const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

async function inflate(data: Uint8Array): Promise<Uint8Array> {
  const stream = new Blob([data as BlobPart]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function indexOfNul(buf: Uint8Array, from: number): number {
  for (let i = from; i < buf.length; i++) if (buf[i] === 0) return i;
  return -1;
}

export function isPng(buf: Uint8Array): boolean {
  return buf.length >= 8 && SIGNATURE.every((b, i) => buf[i] === b);
}

/** All text chunks as keyword → text (first occurrence wins). Throws on a non-PNG. */
export async function readPngText(input: ArrayBuffer | Uint8Array): Promise<Record<string, string>> {
  const buf = input instanceof Uint8Array ? input : new Uint8Array(input);
  if (!isPng(buf)) throw new Error("not a PNG file");
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const out: Record<string, string> = {};
  let pos = 8;
  while (pos + 8 <= buf.length) {
    const len = view.getUint32(pos);
    const type = latin1.decode(buf.subarray(pos + 4, pos + 8));
    const start = pos + 8;
    const end = start + len;
    if (end + 4 > buf.length) break; // truncated file: keep what was read
    const data = buf.subarray(start, end);
    try {
      if (type === "tEXt" || type === "comf") {
        const nul = indexOfNul(data, 0);
        if (nul > 0) {
          const key = latin1.decode(data.subarray(0, nul));
          // ComfyUI writes JSON with ASCII escapes; decode as UTF-8 so either form survives.
          if (!(key in out)) out[key] = utf8.decode(data.subarray(nul + 1));
        }
      } else if (type === "zTXt") {
        const nul = indexOfNul(data, 0);
        if (nul > 0) {
          const key = latin1.decode(data.subarray(0, nul));
          // byte after NUL is the compression method (0 = deflate)
          const text = await inflate(data.subarray(nul + 2));
          if (!(key in out)) out[key] = latin1.decode(text);
        }
      } else if (type === "iTXt") {
        const nul = indexOfNul(data, 0);
        if (nul > 0) {
          const key = latin1.decode(data.subarray(0, nul));
          const compressed = data[nul + 1] === 1;
          const langEnd = indexOfNul(data, nul + 3);
          const transEnd = langEnd >= 0 ? indexOfNul(data, langEnd + 1) : -1;
          if (transEnd >= 0) {
            const raw = data.subarray(transEnd + 1);
            const text = compressed ? await inflate(raw) : raw;
            if (!(key in out)) out[key] = utf8.decode(text);
          }
        }
      } else if (type === "IEND") {
        break;
      }
    } catch (e) {
      console.warn(`skipping unreadable ${type} chunk`, e);
    }
    pos = end + 4; // skip CRC
  }
  return out;
}
