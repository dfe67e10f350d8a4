// browser.mjs: transformers.js's pipeline('text-generation') in the browser over a --layout hf export, offline.
// In:  browser.html?model=<URL of the export's directory, e.g. /m/int4/>&steps=N: its config.json (dtype), manifest.json
//      (session options), golden.json (prompts) and the files transformers.js fetches itself (tokenizer, onnx/model*.onnx
//      and its .onnx_data). transformers.js is the self-contained dist build from node_modules; onnxruntime-web's wasm
//      is served from node_modules/onnxruntime-web/dist (the version transformers.js bundles).
// Out: window.result = {dtype, cases, pipeline_text} (cases.mjs); each case's greedy ids appended to #tokens as
//      "case: row | row"; document.title "passed" when the pipeline's tokenizer gave every golden prompt's ids,
//      "failed" when not, "error" (with #status) when loading or generating failed. The caller judges the ids.
import { env, pipeline } from './node_modules/@huggingface/transformers/dist/transformers.js';
import { runCases, sessionExtra } from './cases.mjs';

const params = new URLSearchParams(location.search);
const model = new URL(params.get('model') ?? '', location.href);
const steps = Number(params.get('steps') ?? 16);
const show = (text) => { document.getElementById('status').textContent = text; };
const json = async (name) => {
  const response = await fetch(new URL(name, model));
  if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
  return response.json();
};

env.allowLocalModels = true; // the browser build's default is false
env.allowRemoteModels = false; // local files only: no hub access
env.localModelPath = new URL('..', model).pathname; // a path: with a full URL it would not look for the tokenizer
env.useBrowserCache = false;
env.backends.onnx.wasm.wasmPaths = new URL('./node_modules/onnxruntime-web/dist/', import.meta.url).href;

try {
  const [config, manifest, golden] = await Promise.all(['config.json', 'manifest.json', 'golden.json'].map(json));
  const dtype = config['transformers.js_config'].dtype;
  show(`loading ${model.pathname} (${dtype})`);
  const name = model.pathname.replace(/\/$/, '').split('/').pop();
  const generator = await pipeline('text-generation', name,
    { dtype, device: 'wasm', session_options: { extra: sessionExtra(manifest) } });
  show('generating');
  window.result = { dtype, ...(await runCases(generator, golden, steps)) };
  for (const c of window.result.cases) {
    document.getElementById('tokens').textContent += `${c.name}: ${c.greedy_ids.map((r) => r.join(' ')).join(' | ')}\n`;
  }
  const ok = window.result.cases.every((c) => c.prompt_ids_equal);
  show(ok ? 'generated; the tokenizer gave the golden prompt ids' : 'generated; the tokenizer did NOT give the golden prompt ids');
  document.title = ok ? 'passed' : 'failed';
} catch (e) {
  show(`error: transformers.js could not run ${model.pathname}: ${String(e.message ?? e).split('\n')[0]}`);
  document.title = 'error';
}
