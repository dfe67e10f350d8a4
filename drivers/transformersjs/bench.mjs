// bench.mjs: transformers.js (Node, onnxruntime-node) timed on a --layout hf export, as tools.bench times our runtime.
// In:  node bench.mjs ARTIFACT_DIR NEW_TOKENS, and on stdin a JSON list of prompts (token ids, one row per prompt;
//      tools/bench_embed.py sends tools.bench's fixed prompts). The manifest's session options go to onnxruntime-node.
// Out: one JSON line: {impl, ttft_s, prefill_tok_s, decode_tok_s, load_s, peak_rss_mb}. Greedy, EOS ignored
//      (min_new_tokens = max_new_tokens), after a warm-up of 4 tokens over the prompts' first 16 ids. A streamer marks
//      the prompt, each token and the end: TTFT runs to the first token (transformers.js picks it in the same step as
//      the prompt's logits, so prefill tokens/s = prompt tokens / TTFT), decode covers the remaining NEW_TOKENS - 1.
import { readFileSync } from "node:fs";
import path from "node:path";
import { AutoModelForCausalLM, Tensor, env } from "@huggingface/transformers";
import { sessionExtra } from "./cases.mjs";

const [dir, newArg] = process.argv.slice(2);
const steps = Number(newArg ?? 64);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;

function feeds(prompts) {
  const batch = prompts.length, width = prompts[0].length;
  const ids = new Tensor("int64", BigInt64Array.from(prompts.flat(), BigInt), [batch, width]);
  const mask = new Tensor("int64", new BigInt64Array(batch * width).fill(1n), [batch, width]);
  return { input_ids: ids, attention_mask: mask };
}

async function timed(model, prompts, n) {
  const marks = [];
  const streamer = { put: () => marks.push(performance.now()), end: () => marks.push(performance.now()) };
  await model.generate({ ...feeds(prompts), max_new_tokens: n, min_new_tokens: n, do_sample: false, streamer });
  return { start: marks[0], first: marks[1], end: marks.at(-1) };
}

try {
  const prompts = JSON.parse(readFileSync(0, "utf8"));
  const config = JSON.parse(readFileSync(path.join(dir, "config.json"), "utf8"));
  const manifest = JSON.parse(readFileSync(path.join(dir, "manifest.json"), "utf8"));
  const t0 = performance.now();
  const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(dir)), {
    dtype: config["transformers.js_config"].dtype, device: "cpu", session_options: { extra: sessionExtra(manifest) } });
  const load = (performance.now() - t0) / 1000;
  await timed(model, prompts.map((p) => p.slice(0, 16)), 4); // warm-up
  const { start, first, end } = await timed(model, prompts, steps);
  const tokens = prompts.length * prompts[0].length;
  console.log(JSON.stringify({
    impl: "transformers.js 4.3.1 (onnxruntime-node 1.30)", ttft_s: +((first - start) / 1000).toFixed(4),
    prefill_tok_s: +(tokens / ((first - start) / 1000)).toFixed(2),
    decode_tok_s: +(((steps - 1) * prompts.length) / ((end - first) / 1000)).toFixed(2),
    load_s: +load.toFixed(2), peak_rss_mb: Math.round(process.resourceUsage().maxRSS / 1024),
  }));
} catch (e) {
  console.error(`error: transformers.js could not time ${dir}: ${String(e.message ?? e).split("\n")[0]}`);
  process.exit(1);
}
