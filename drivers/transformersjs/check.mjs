// transformers.js (Node) runs an artifact exported with `python -m ernie_export --layout hf`, offline.
// In:  node check.mjs ARTIFACT_DIR [STEPS] [--no-session-options] — golden.json supplies the prompts (texts, ids);
//      the manifest's session options are passed as onnxruntime-node's `extra` (transformers.js reads none itself).
//      The cases themselves are cases.mjs (browser.mjs runs the same in Chromium).
// Out: one JSON line on stdout: {dtype, cases: [{name, prompt_ids_equal, greedy_ids: [[...] per row]}], pipeline_text}
//      greedy ids from model.generate (do_sample false) over the pipeline's own tokenizer and model; the caller
//      compares them with its runtime. Exit 1 with one line on stderr when loading or generating fails.
import { readFileSync } from "node:fs";
import path from "node:path";
import { env, pipeline } from "@huggingface/transformers";
import { runCases, sessionExtra } from "./cases.mjs";

const args = process.argv.slice(2);
const bare = args.includes("--no-session-options"); // a negative control: what a caller who omits them gets
const [dir, stepsArg] = args.filter((a) => a !== "--no-session-options");
const steps = Number(stepsArg ?? 16);
env.allowRemoteModels = false; // local files only: no hub access
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;

try {
  const config = JSON.parse(readFileSync(path.join(dir, "config.json"), "utf8"));
  const manifest = JSON.parse(readFileSync(path.join(dir, "manifest.json"), "utf8"));
  const dtype = config["transformers.js_config"].dtype;
  const generator = await pipeline("text-generation", path.basename(path.resolve(dir)),
    { dtype, device: "cpu", session_options: bare ? {} : { extra: sessionExtra(manifest) } });
  const golden = JSON.parse(readFileSync(path.join(dir, "golden.json"), "utf8"));
  console.log(JSON.stringify({ dtype, ...(await runCases(generator, golden, steps)) }));
} catch (e) {
  console.error(`error: transformers.js could not run ${dir}: ${String(e.message ?? e).split("\n")[0]}`);
  process.exit(1);
}
