// main.js: the browser driver: the golden check of runtime/check.py over onnxruntime-web (wasm), DECODE graph only.
// In:  ?model=<URL of an artifact directory>: its manifest.json, golden.json (files.golden), the decode
//      graph, and weights.bin handed to ONNX Runtime as the graph's external data (fetched by URL).
// Out: each step's greedy ids appended to <pre id="tokens"> as "case step: id id ..." while it runs;
//      then <div id="status"> and document.title say "passed" / "failed" (or "error") with the figures,
//      and window.result holds them (with the ids the model picked) for scripts such as run-headless.mjs.
// The first step feeds the left-padded prompt with an EMPTY past ([B, kv_heads, 0, head_dim]), which
// equals prefill: only one graph is ever loaded, which keeps the wasm memory down.
import * as ort from './node_modules/onnxruntime-web/dist/ort.wasm.min.mjs';

const LEVELS = { ORT_DISABLE_ALL: 'disabled', ORT_ENABLE_BASIC: 'basic', ORT_ENABLE_EXTENDED: 'extended',
  ORT_ENABLE_LAYOUT: 'layout', ORT_ENABLE_ALL: 'all' };
const CACHE_TYPES = { float32: Float32Array, float16: Uint16Array };

const show = (text) => { document.getElementById('status').textContent = text; };
const stream = (line) => { document.getElementById('tokens').textContent += `${line}\n`; };

async function fetchOk(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

/** Session options from the manifest: "a.b": "v" config entries become extra {a: {b: "v"}}. */
function sessionOptions(manifest) {
  const extra = {};
  for (const [key, value] of Object.entries(manifest.session_options.config)) {
    const dot = key.indexOf('.');
    (extra[key.slice(0, dot)] ??= {})[key.slice(dot + 1)] = value;
  }
  return { executionProviders: ['wasm'], graphOptimizationLevel: LEVELS[manifest.session_options.graph_optimization_level], extra };
}

/** Teacher-forced over the decode graph: step 0 is the prompt with an empty past, step k feeds greedy_ids[:, k-1]. */
async function checkCase(session, manifest, kase, golden) {
  const greedy = kase.greedy_ids, batch = greedy.length, vocab = manifest.model.dims.vocab_size;
  const width = Math.max(...kase.prompt_ids.map((p) => p.length));
  let ids = new BigInt64Array(batch * width).fill(BigInt(manifest.tokens.pad_token_id)); // left padded
  let mask = new BigInt64Array(batch * width), pos = new BigInt64Array(batch * width), total = width;
  kase.prompt_ids.forEach((p, r) => p.forEach((id, i) => {
    const at = r * width + width - p.length + i;
    [ids[at], mask[at], pos[at]] = [BigInt(id), 1n, BigInt(i)]; // a position counts the real tokens before it
  }));
  const pastNames = new Set(manifest.cache.pairs.map((p) => p.past));
  const feeds = {}; // the empty past: [batch, kv_heads, 0, head_dim]
  for (const v of manifest.graphs.decode.inputs.filter((v) => pastNames.has(v.name))) {
    const dims = v.shape.map((d) => (d === 'batch_size' ? batch : typeof d === 'string' ? 0 : d));
    feeds[v.name] = new ort.Tensor(v.dtype, new CACHE_TYPES[v.dtype](0), dims);
  }
  const picked = greedy.map(() => []);
  let agree = 0, worst = 0;
  for (let step = 0; step < golden.steps; step++) {
    const news = ids.length / batch;
    Object.assign(feeds, { input_ids: new ort.Tensor('int64', ids, [batch, news]),
      attention_mask: new ort.Tensor('int64', mask, [batch, total]), position_ids: new ort.Tensor('int64', pos, [batch, news]) });
    const out = await session.run(feeds);
    const per = out.logits.dims[1] * vocab; // [B, 1, V] (or [B, S, V] with full_logits: the last position)
    for (let r = 0; r < batch; r++) {
      const row = out.logits.data.subarray(r * per + per - vocab, r * per + per);
      let best = 0;
      for (let i = 1; i < vocab; i++) if (row[i] > row[best]) best = i;
      picked[r].push(best);
      agree += best === greedy[r][step] ? 1 : 0;
      if (step < golden.top_logits_steps) {
        for (const [id, value] of kase.top_logits[r][step]) worst = Math.max(worst, Math.abs(row[id] - value));
      }
    }
    stream(`${kase.name} ${step}: ${picked.map((p) => p[step]).join(' ')}`);
    if (step + 1 === golden.steps) break;
    for (const { present, past } of manifest.cache.pairs) feeds[past] = out[present]; // the cache grows
    const grown = new BigInt64Array(batch * (total + 1));
    pos = new BigInt64Array(batch);
    for (let r = 0; r < batch; r++) {
      grown.set(mask.subarray(r * total, (r + 1) * total), r * (total + 1));
      grown[r * (total + 1) + total] = 1n;
      for (let t = 0; t < total; t++) pos[r] += mask[r * total + t]; // real tokens so far
    }
    [mask, total, ids] = [grown, total + 1, BigInt64Array.from(greedy, (g) => BigInt(g[step]))];
  }
  return { name: kase.name, rows: batch, agreement: agree / (batch * golden.steps), max_abs_logit_diff: worst, greedy_ids: picked };
}

async function main() {
  const t0 = performance.now();
  const model = new URLSearchParams(location.search).get('model');
  if (!model) throw new Error('give the artifact directory as ?model=<url>');
  const base = new URL(model.endsWith('/') ? model : `${model}/`, location.href);
  const manifest = await (await fetchOk(new URL('manifest.json', base))).json();
  if (manifest.format !== 'ernie4_5-onnx' || manifest.format_version !== 2) throw new Error('not a format 2 ernie4_5-onnx manifest');
  if (!(manifest.dtype in CACHE_TYPES)) throw new Error(`${manifest.dtype} artifacts have no JavaScript tensor type`);
  if (manifest.profile.kv_cache !== 'concat') { // the shared buffer needs onnxruntime's GroupQueryAttention (no wasm kernel tested)
    throw new Error(`KV cache kind ${manifest.profile.kv_cache} is not supported by this page; export with --ops standard`);
  }
  if (!manifest.files.golden) throw new Error('the artifact has no golden vectors; re-export with verification on');
  const golden = await (await fetchOk(new URL(manifest.files.golden.path, base))).json();
  if (golden.min_agreement === undefined) throw new Error('golden.json records no min_agreement: re-verify the artifact');
  ort.env.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href; // served here, no CDN
  ort.env.wasm.numThreads = self.crossOriginIsolated ? navigator.hardwareConcurrency : 1;
  show(`loading ${manifest.files.decode.path} and ${manifest.files.weights.path} ...`);
  const graph = new Uint8Array(await (await fetchOk(new URL(manifest.files.decode.path, base))).arrayBuffer());
  const weights = manifest.files.weights.path;
  const session = await ort.InferenceSession.create(graph, { ...sessionOptions(manifest),
    externalData: [{ path: weights, data: new URL(weights, base).href }] });
  const loaded = (performance.now() - t0) / 1000;
  const cases = [];
  for (const kase of golden.cases) {
    show(`running case ${kase.name} ...`);
    cases.push(await checkCase(session, manifest, kase, golden));
  }
  await session.release();
  const rows = cases.reduce((n, c) => n + c.rows, 0);
  const agreement = cases.reduce((n, c) => n + c.agreement * c.rows, 0) / rows;
  const worst = Math.max(...cases.map((c) => c.max_abs_logit_diff));
  const passed = worst <= golden.tolerance && (golden.exact ? agreement === 1 : agreement >= golden.min_agreement);
  const seconds = (performance.now() - t0) / 1000;
  window.result = { passed, agreement, max_abs_logit_diff: worst, tolerance: golden.tolerance, exact: golden.exact,
    cases, driver: 'onnxruntime-web', load_seconds: loaded, seconds };
  const verdict = passed ? 'passed' : 'failed';
  show(`${verdict}: top-1 agreement ${(100 * agreement).toFixed(2)}%, max |logit diff| ${worst.toExponential(2)} ` +
    `(tolerance ${golden.tolerance}, ${golden.exact ? 'exact' : `agreement >= ${golden.min_agreement}`}); load ${loaded.toFixed(1)} s, ` +
    `total ${seconds.toFixed(1)} s`);
  document.title = verdict;
}

main().catch((e) => {
  window.result = { error: String(e?.message ?? e) };
  show(`error: ${window.result.error}`);
  document.title = 'error';
});
