// cases.mjs: what check.mjs (Node) and browser.mjs (headless Chromium) both run over a --layout hf export.
// In:  a transformers.js text-generation pipeline, the artifact's golden.json (prompt texts and ids), a step count;
//      for sessionExtra, the artifact's manifest.json.
// Out: runCases -> {cases: [{name, prompt_ids_equal, greedy_ids: [[...] per row]}], pipeline_text}: the golden prompts
//      tokenized by the pipeline's own tokenizer (padding side from tokenizer_config.json), greedy ids from
//      model.generate (do_sample false), and the pipeline's text for the first prompt; the caller compares them.

/** The manifest's session options as onnxruntime's nested `extra` ("session.x": "1" -> {session: {x: "1"}}):
 *  transformers.js reads none from config.json, and quantized standard-op graphs need theirs (the MatMulNBits
 *  accuracy level verification used) to give our ids. */
export function sessionExtra(manifest) {
  const extra = {};
  for (const [key, value] of Object.entries(manifest.session_options.config)) {
    const dot = key.indexOf(".");
    (extra[key.slice(0, dot)] ??= {})[key.slice(dot + 1)] = value;
  }
  return extra;
}

export async function runCases(generator, golden, steps) {
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
  return { cases, pipeline_text: first.generated_text };
}
