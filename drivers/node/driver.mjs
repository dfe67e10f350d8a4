// driver.mjs: a small Node.js library over onnxruntime-node for one ERNIE 4.5 ONNX artifact.
// In:  an artifact directory; only its manifest.json is read here (format 2). The graphs are opened
//      BY PATH with the manifest's session options: ONNX Runtime memory-maps weights.bin as their
//      external data. With prepacking off (the manifest's session.disable_prepacking) both sessions share
//      its pages: one copy of the weights in memory; with it on (quantized, float32 --ops ort) ONNX
//      Runtime packs a copy per session, so only the decode graph is opened.
// Out: openArtifact(dir) -> {manifest, start(prompts), advance(tokens, cache), ...}: the logits of
//      the last position per row (Float32Array [vocab] each) and the KV cache to continue from.
//      Token ids in and out only: there is no tokenizer in Node.
//      The KV-cache kinds (manifest.profile.kv_cache): "concat" (prefill + decode, left padding) and
//      "shared_buffer" / "shared_buffer_vt" (decode only, right padding, no position_ids; _vt stores values
//      transposed: the cache shapes come from the manifest). This driver feeds each present back as the next
//      past, starting from an empty buffer: the graph then sizes the present to the sequence and copies the
//      past into it (correct, not in place, and for _vt through the kernel's branch, not the faster one that
//      needs a reserved buffer; the Python runtime binds one buffer as both, which onnxruntime-node's run()
//      cannot express).
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import ort from 'onnxruntime-node';

export const FORMAT = 'ernie4_5-onnx';
export const FORMAT_VERSION = 2;
// The manifest's ONNX Runtime level names -> onnxruntime-common's graphOptimizationLevel.
const LEVELS = { ORT_DISABLE_ALL: 'disabled', ORT_ENABLE_BASIC: 'basic', ORT_ENABLE_EXTENDED: 'extended',
  ORT_ENABLE_LAYOUT: 'layout', ORT_ENABLE_ALL: 'all' };
const CACHE_TYPES = ['float32', 'float16']; // bfloat16 has no JavaScript tensor type
const KV_CACHES = ['concat', 'shared_buffer', 'shared_buffer_vt'];

export class ArtifactError extends Error {}

/** manifest.json of `dir`, checked for format, version and the sizes of the files it lists. */
export function readManifest(dir) {
  let manifest;
  try {
    manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8'));
  } catch (e) {
    throw new ArtifactError(`${dir}: cannot read manifest.json (${e.message}); re-run the export`);
  }
  if (manifest.format !== FORMAT || manifest.format_version !== FORMAT_VERSION) {
    throw new ArtifactError(`${dir}: not an ${FORMAT} manifest of format version ${FORMAT_VERSION} ` +
      `(got ${manifest.format} ${manifest.format_version})`);
  }
  for (const [role, entry] of Object.entries(manifest.files)) {
    if (entry.path.startsWith('/') || entry.path.split(/[\\/]/).includes('..')) {
      throw new ArtifactError(`the ${role} file ${entry.path} is not inside the artifact`);
    }
    const size = statSync(join(dir, entry.path), { throwIfNoEntry: false })?.size;
    if (size !== entry.size) {
      throw new ArtifactError(`${entry.path} (${role}) has ${size ?? 'no'} bytes, the manifest says ${entry.size}`);
    }
  }
  if (!KV_CACHES.includes(manifest.profile.kv_cache)) {
    throw new ArtifactError(`KV cache kind ${manifest.profile.kv_cache} is not supported by this driver ` +
      `(supported: ${KV_CACHES.join(', ')}); upgrade the driver or re-export`);
  }
  if (!CACHE_TYPES.includes(manifest.dtype)) {
    throw new ArtifactError(`${manifest.dtype} artifacts have no JavaScript tensor type; use float32 or float16`);
  }
  const need = manifest.onnxruntime?.minimum, have = ort.env.versions.node;
  if (need && olderThan(have, need)) {
    throw new ArtifactError(`this artifact needs onnxruntime >= ${need} (its graphs were run there), but ` +
      `onnxruntime-node ${have} is installed: upgrade onnxruntime-node, or export a profile it runs`);
  }
  return manifest;
}

/** Is version a (x.y.z) older than b? */
function olderThan(a, b) {
  const [x, y] = [a, b].map((v) => v.split('.').map((n) => parseInt(n, 10) || 0));
  for (let i = 0; i < 3; i++) if ((x[i] ?? 0) !== (y[i] ?? 0)) return (x[i] ?? 0) < (y[i] ?? 0);
  return false;
}

/** A JSON file the manifest lists under `role` (golden, generation), or null when it lists none. */
export function readListed(dir, manifest, role) {
  const entry = manifest.files[role];
  return entry ? JSON.parse(readFileSync(join(dir, entry.path), 'utf8')) : null;
}

/** onnxruntime-node session options from the manifest: "a.b": "v" config entries become extra {a: {b: "v"}}. */
export function sessionOptions(manifest, { prepacking } = {}) {
  const so = manifest.session_options;
  const extra = {};
  for (const [key, value] of Object.entries(so.config)) {
    const dot = key.indexOf('.');
    (extra[key.slice(0, dot)] ??= {})[key.slice(dot + 1)] = value;
  }
  if (prepacking !== undefined) (extra.session ??= {}).disable_prepacking = prepacking ? '0' : '1'; // for measuring
  const level = LEVELS[so.graph_optimization_level];
  if (!level) throw new ArtifactError(`unknown graph_optimization_level ${so.graph_optimization_level}`);
  return { executionProviders: ['cpu'], graphOptimizationLevel: level, extra };
}

/** left-padded [B, S] int64 ids, mask (1 real, 0 pad) and positions (real tokens before each token). */
export function leftPad(prompts, padId) {
  const batch = prompts.length, width = Math.max(...prompts.map((p) => p.length));
  const ids = new BigInt64Array(batch * width).fill(BigInt(padId));
  const mask = new BigInt64Array(batch * width), pos = new BigInt64Array(batch * width);
  prompts.forEach((p, row) => {
    const pad = width - p.length;
    p.forEach((id, i) => {
      ids[row * width + pad + i] = BigInt(id);
      mask[row * width + pad + i] = 1n;
      pos[row * width + pad + i] = BigInt(i);
    });
  });
  return { batch, width, ids, mask, pos };
}

/** right-padded [B, S] int64 ids and mask (a shared buffer's layout: every row starts at position 0). */
export function rightPad(prompts, padId) {
  const batch = prompts.length, width = Math.max(...prompts.map((p) => p.length));
  const ids = new BigInt64Array(batch * width).fill(BigInt(padId)), mask = new BigInt64Array(batch * width);
  prompts.forEach((p, row) => p.forEach((id, i) => {
    ids[row * width + i] = BigInt(id);
    mask[row * width + i] = 1n;
  }));
  return { batch, width, ids, mask };
}

/** One graph's I/O from the manifest, checked against the session's own names and order. */
function graphIO(manifest, graph, session) {
  const { inputs, outputs } = manifest.graphs[graph];
  const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
  if (!same(session.inputNames, inputs.map((v) => v.name)) || !same(session.outputNames, outputs.map((v) => v.name))) {
    throw new ArtifactError(`${graph} graph I/O names differ from the manifest's; re-run the export`);
  }
  const feeds = Object.fromEntries(manifest.cache.pairs.map((p) => [p.present, p.past]));
  const pastNames = new Set(Object.values(feeds));
  return { graph, session, inputs, past: inputs.filter((v) => pastNames.has(v.name)),
    present: outputs.filter((v) => v.name in feeds).map((v) => v.name), feeds };
}

/** Run one graph: ids/pos [B, S], mask [B, T] (past + new), cache {values: {past name: Tensor}, mask} or null. */
async function run(io, batch, ids, mask, pos, cache, vocab) {
  const width = ids.length / batch, total = mask.length / batch;
  const feeds = { input_ids: new ort.Tensor('int64', ids, [batch, width]),
    attention_mask: new ort.Tensor('int64', mask, [batch, total]) };
  if (pos !== null) feeds.position_ids = new ort.Tensor('int64', pos, [batch, width]); // none for a shared buffer
  for (const { name } of io.past) feeds[name] = cache.values[name];
  const out = await io.session.run(feeds);
  const logits = out.logits, rows = []; // [B, 1, V], or [B, S, V] for full_logits artifacts: the last position
  const per = logits.dims[1] * vocab;
  for (let b = 0; b < batch; b++) rows.push(logits.data.subarray(b * per + per - vocab, b * per + per));
  const values = {};
  for (const name of io.present) values[io.feeds[name]] = out[name];
  return { logits: rows, cache: { values, mask, batch } };
}

/** Per row, the position of a token appended now: the number of real tokens in the cache. */
function nextPositions(cache) {
  const total = cache.mask.length / cache.batch, pos = new BigInt64Array(cache.batch);
  for (let b = 0; b < cache.batch; b++) for (let t = 0; t < total; t++) pos[b] += cache.mask[b * total + t];
  return pos;
}

/** A right-padded [B, T] mask with one more real position per row: T' = the longest row + 1. */
function growRight(cache) {
  const lengths = nextPositions(cache);
  const width = Number(lengths.reduce((a, b) => (a > b ? a : b), 0n)) + 1, out = new BigInt64Array(cache.batch * width);
  for (let b = 0; b < cache.batch; b++) out.fill(1n, b * width, b * width + Number(lengths[b]) + 1);
  return out;
}

/** Append `extra` [B, S] mask columns to a [B, T] mask. */
function growMask(mask, batch, extra) {
  const t = mask.length / batch, s = extra.length / batch, out = new BigInt64Array(batch * (t + s));
  for (let b = 0; b < batch; b++) {
    out.set(mask.subarray(b * t, (b + 1) * t), b * (t + s));
    out.set(extra.subarray(b * s, (b + 1) * s), b * (t + s) + t);
  }
  return out;
}

/** Open both graphs of the artifact in `dir`; `options.prepacking` overrides the manifest (measurements only). */
export async function openArtifact(dir, options = {}) {
  const manifest = readManifest(dir);
  const so = sessionOptions(manifest, options);
  const open = async (graph) => graphIO(manifest, graph,
    await ort.InferenceSession.create(join(dir, manifest.files[graph].path), so));
  const shared = manifest.profile.kv_cache !== 'concat';
  // Prepacked weights (quantized, float32): each session would keep a packed copy of its own, so the decode graph
  // alone takes prompts after an empty past (the contract: that equals prefill), as the Python runtime does.
  const packed = so.extra.session?.disable_prepacking === '0';
  const prefill = shared || packed ? null : await open('prefill'), decode = await open('decode');
  const vocab = manifest.model.dims.vocab_size, padId = manifest.tokens.pad_token_id;
  // an empty cache: the manifest's shape, batch_size given, the length (the other symbolic dim) 0
  const dims = (v, batch) => v.shape.map((d) => (d === 'batch_size' ? batch : typeof d === 'string' ? 0 : d));
  const empty = (batch) => ({ batch, mask: new BigInt64Array(0), values: Object.fromEntries(decode.past.map(
    (v) => [v.name, new ort.Tensor(v.dtype, v.dtype === 'float16' ? new Uint16Array(0) : new Float32Array(0), dims(v, batch))])) });
  return {
    manifest, prefill, decode, vocab, padId,
    /** Prefill padded prompts (lists of token ids) -> {logits: [Float32Array(vocab)] per row, cache}. */
    async start(prompts) {
      if (shared) { // a prompt is decode after an empty buffer; a first prompt may be right padded
        const { batch, ids, mask } = rightPad(prompts, padId);
        return run(decode, batch, ids, mask, null, empty(batch), vocab);
      }
      const { batch, ids, mask, pos } = leftPad(prompts, padId);
      return prefill ? run(prefill, batch, ids, mask, pos, null, vocab) : run(decode, batch, ids, mask, pos, empty(batch), vocab);
    },
    /** Feed one token id per row after `cache` -> {logits, cache}. */
    async advance(tokens, cache) {
      const ids = BigInt64Array.from(tokens, BigInt);
      if (shared) return run(decode, cache.batch, ids, growRight(cache), null, cache, vocab);
      const ones = new BigInt64Array(cache.batch).fill(1n);
      return run(decode, cache.batch, ids, growMask(cache.mask, cache.batch, ones), nextPositions(cache), cache, vocab);
    },
    async release() {
      await prefill?.session.release();
      await decode.session.release();
    },
  };
}

/** Index of the largest value (the first on ties, as numpy's argmax). */
export function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}
