#!/usr/bin/env node
// run-headless.mjs: `node drivers/web/run-headless.mjs URL [--timeout SECONDS]` opens the page in headless chromium.
// In:  the page URL (index.html?model=...), served over http; the system chromium (env CHROMIUM_PATH, else
//      /usr/bin/chromium), driven through puppeteer-core.
// Out: one JSON object on stdout: {title, status, tokens (the #tokens text), result (window.result), seconds};
//      exit 0 when the page finished (passed or failed), 1 on a page error, 3 on timeout. The page's
//      console errors go to stderr.
import { parseArgs } from 'node:util';
import puppeteer from 'puppeteer-core';

const { values: args, positionals } = parseArgs({ allowPositionals: true, options: { timeout: { type: 'string', default: '120' } } });
if (positionals.length !== 1) {
  console.error('usage: node drivers/web/run-headless.mjs URL [--timeout SECONDS]');
  process.exit(2);
}
const timeout = Number(args.timeout) * 1000, t0 = performance.now();
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
  headless: true,
  args: process.getuid?.() === 0 ? ['--no-sandbox'] : [], // chromium refuses to run as root with its sandbox
  protocolTimeout: timeout + 30000,
});
let code = 0, report;
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error(`[page] ${m.text()}`); });
  page.on('pageerror', (e) => console.error(`[page] ${e.message}`));
  await page.goto(positionals[0], { timeout });
  const finished = await page.waitForFunction(() => ['passed', 'failed', 'error'].includes(document.title),
    { timeout, polling: 250 }).then(() => true, () => false);
  report = await page.evaluate(() => ({ title: document.title, status: document.getElementById('status').textContent,
    tokens: document.getElementById('tokens').textContent, result: window.result ?? null }));
  code = !finished ? 3 : report.title === 'error' ? 1 : 0;
} finally {
  await browser.close();
}
console.log(JSON.stringify({ ...report, seconds: (performance.now() - t0) / 1000 }));
process.exitCode = code;
