// transformers.js (Node) runs an artifact exported with `python -m ernie_export --layout hf`, offline.
// In:  node check.mjs ARTIFACT_DIR [STEPS] [--no-session-options] — golden.json supplies the prompts (texts, ids);
//      the manifest's session options are passed as onnxruntime-node's `extra` (transformers.js reads none itself).
// Out: one JSON line on stdout: {dtype, cases: [{name, prompt_ids_equal, greedy_ids: [[...] per row]}], pipeline_text}
//      greedy ids from model.generate (do_sample false) over the pipeline's own tokenizer and model; the caller
//      compares them with its runtime. Exit 1 with one line on stderr when loading or generating fails.
import { readFileSync } from "node:fs";
import path from "node:path";
import { env, pipeline } from "@huggingface/transformers";

const args = process.argv.slice(2);
const bare = args.includes("--no-session-options"); // a negative control: what a caller who omits them gets
const [dir, stepsArg] = args.filter((a) => a !== "--no-session-options");
const steps = Number(stepsArg ?? 16);
env.allowRemoteModels = false; // local files only: no hub access
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;

// The manifest's session options as onnxruntime-node's nested `extra` ("session.x": "1" -> {session: {x: "1"}}):
// quantized standard-op graphs need theirs (the MatMulNBits accuracy level verification used) to give our ids.
function sessionEntries(dir) {
  const config = JSON.parse(readFileSync(path.join(dir, "manifest.json"), "utf8")).session_options.config;
  const extra = {};
  for (const [key, value] of Object.entries(config)) {
    const [group, ...rest] = key.split(".");
    (extra[group] ??= {})[rest.join(".")] = value;
  }
  return extra;
}

try {
  const config = JSON.parse(readFileSync(path.join(dir, "config.json"), "utf8"));
  const dtype = config["transformers.js_config"].dtype;
  const generator = await pipeline("text-generation", path.basename(path.resolve(dir)),
    { dtype, device: "cpu", session_options: bare ? {} : { extra: sessionEntries(dir) } });
  const golden = JSON.parse(readFileSync(path.join(dir, "golden.json"), "utf8"));
  const cases = [];
  for (const c of golden.cases) {
    const inputs = generator.tokenizer(c.text, { padding: true, add_special_tokens: false });
    const mask = inputs.attention_mask.tolist();
    const ids = inputs.input_ids.tolist().map((row, r) => row.filter((_, i) => mask[r][i] == 1n).map(Number));
    const out = await generator.model.generate({ ...inputs, max_new_tokens: steps, do_sample: false });
    const width = inputs.input_ids.dims[1];
    cases.push({
      name: c.name,
      prompt_ids_equal: JSON.stringify(ids) === JSON.stringify(c.prompt_ids),
      greedy_ids: out.tolist().map((row) => row.slice(width).map(Number)),
    });
  }
  const [first] = await generator(golden.cases[0].text[0], { max_new_tokens: steps, do_sample: false, return_full_text: false });
  console.log(JSON.stringify({ dtype, cases, pipeline_text: first.generated_text }));
} catch (e) {
  console.error(`error: transformers.js could not run ${dir}: ${String(e.message ?? e).split("\n")[0]}`);
  process.exit(1);
}
