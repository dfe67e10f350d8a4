#!/usr/bin/env node
// check.mjs: `node drivers/node/check.mjs --model ART [--json] [--prepacking on|off]`: runtime/check.py in Node.
// In:  an artifact directory: manifest.json, and golden.json as its files.golden lists it.
// Out: per case, teacher-forced top-1 agreement and the largest |logit diff| on the recorded top ids,
//      printed as runtime/check.py prints them (or one JSON object with --json, plus the ids the
//      model picked as greedy_ids); exit 0 when the check holds, 1 when not, 2 on an error.
import { parseArgs } from 'node:util';
import { argmax, openArtifact, readListed } from './driver.mjs';


/** Teacher-forced: at step k count argmax == greedy_ids[row][k], then feed greedy_ids[:, k]. */
function requireFloor(golden) {
  // golden.json carries its own agreement floor (version 2); older ones left it to each driver
  if (golden.min_agreement === undefined) throw new Error('golden.json records no min_agreement: re-verify the artifact');
}

async function checkCase(model, kase, golden) {
  const greedy = kase.greedy_ids, rows = greedy.length, picked = greedy.map(() => []);
  let agree = 0, worst = 0;
  let { logits, cache } = await model.start(kase.prompt_ids);
  for (let step = 0; step < golden.steps; step++) {
    logits.forEach((row, r) => {
      picked[r].push(argmax(row));
      agree += picked[r][step] === greedy[r][step] ? 1 : 0;
      if (step < golden.top_logits_steps) {
        for (const [id, value] of kase.top_logits[r][step]) worst = Math.max(worst, Math.abs(row[id] - value));
      }
    });
    if (step + 1 === golden.steps) break; // done: the model does not run again
    ({ logits, cache } = await model.advance(greedy.map((g) => g[step]), cache));
  }
  return { name: kase.name, rows, agreement: agree / (rows * golden.steps), max_abs_logit_diff: worst, greedy_ids: picked };
}

export async function check(model, golden) {
  requireFloor(golden);
  const cases = [];
  for (const kase of golden.cases) cases.push(await checkCase(model, kase, golden));
  const rows = cases.reduce((n, c) => n + c.rows, 0);
  const agreement = cases.reduce((n, c) => n + c.agreement * c.rows, 0) / rows;
  const worst = Math.max(...cases.map((c) => c.max_abs_logit_diff));
  const passed = worst <= golden.tolerance && (golden.exact ? agreement === 1 : agreement >= golden.min_agreement);
  return { passed, agreement, max_abs_logit_diff: worst, tolerance: golden.tolerance, exact: golden.exact,
    min_agreement: golden.min_agreement, cases };
}

/** Python's `{:.2e}`: two exponent digits at least (3.81e-06). */
const sci = (x) => x.toExponential(2).replace(/e([+-])(\d)$/, 'e$10$2');

async function main() {
  const { values: args } = parseArgs({ options: { model: { type: 'string' }, json: { type: 'boolean' },
    prepacking: { type: 'string' } } }); // --prepacking on|off overrides the manifest: for measurements only
  if (!args.model) throw new Error('usage: node drivers/node/check.mjs --model ARTIFACT_DIR [--json]');
  const options = args.prepacking === undefined ? {} : { prepacking: args.prepacking === 'on' };
  const t0 = performance.now();
  const model = await openArtifact(args.model, options);
  const golden = readListed(args.model, model.manifest, 'golden');
  if (!golden) throw new Error(`${args.model} has no golden vectors; re-export with verification on`);
  const result = await check(model, golden);
  await model.release();
  if (args.json) {
    const seconds = (performance.now() - t0) / 1000;
    console.log(JSON.stringify({ ...result, provider: 'cpu', driver: 'onnxruntime-node', seconds,
      max_rss_bytes: process.resourceUsage().maxRSS * 1024 }));
  } else {
    for (const c of result.cases) {
      console.log(`${c.name.padStart(18)}: ${c.rows} row(s), top-1 agreement ${(100 * c.agreement).toFixed(2)}%, ` +
        `max |logit diff| ${sci(c.max_abs_logit_diff)}`);
    }
    console.log(`golden vectors ${result.passed ? 'PASSED' : 'FAILED'} on cpu (tolerance ${result.tolerance}, ` +
      `${result.exact ? 'exact' : `agreement >= ${result.min_agreement}`})`);
  }
  return result.passed ? 0 : 1;
}

main().then((code) => { process.exitCode = code; }, (e) => {
  console.error(`error: ${e.message}`);
  process.exitCode = 2;
});
