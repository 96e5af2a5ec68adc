// Browser tests of courier's console: a real courier (the built binary) with real
// deliveries, a fake receiver and a fake upstream in this process, and headless Debian
// chromium driven by playwright-core. Screenshots of each page go to ./artifacts/.
//
//   cargo build && (cd plugins && cargo build --release --target wasm32-wasip2)
//   cd tests/browser && npm ci && npm test
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:http";
import { mkdtempSync, writeFileSync, mkdirSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "../..");
const bin = process.env.COURIER_BIN || join(root, "target/debug/courier");
const chromePath = process.env.CHROMIUM || "/usr/bin/chromium";
const artifacts = join(here, "artifacts");
const TOKEN = "console-test-admin-token-01";
const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

let receiver, upstream, courier, base, browser;
const received = [];
let flakyStatus = 500;

function listen(handler) {
  return new Promise((ok) => {
    const s = createServer(handler);
    s.listen(0, "127.0.0.1", () => ok(s));
  });
}

function waitFor(pred, ms = 15000) {
  const deadline = Date.now() + ms;
  return new Promise((ok, fail) => {
    const tick = () => {
      if (pred()) return ok();
      if (Date.now() > deadline) return fail(new Error("timed out"));
      setTimeout(tick, 25);
    };
    tick();
  });
}

async function post(path, body) {
  const r = await fetch(base + path, { method: "POST", headers: { authorization: "Bearer " + TOKEN }, body: JSON.stringify(body) });
  const text = await r.text();
  assert.equal(r.status, 202, text);
  return JSON.parse(text);
}

before(async () => {
  mkdirSync(artifacts, { recursive: true });
  assert.ok(existsSync(bin), `courier binary missing at ${bin} (cargo build first)`);
  assert.ok(existsSync(chromePath), `chromium missing at ${chromePath}`);
  receiver = await listen((req, res) => {
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", () => {
      received.push({ path: req.url, body, headers: req.headers });
      res.writeHead(req.url.startsWith("/flaky") ? flakyStatus : 200).end("ok");
    });
  });
  upstream = await listen((req, res) => {
    req.resume();
    req.on("end", () => {
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ title: "Arrival", year: 2016, model: "fake" }));
    });
  });
  const r = `http://127.0.0.1:${receiver.address().port}`;
  const dir = mkdtempSync(join(tmpdir(), "courier-console-"));
  const plugin = join(root, "plugins/target/wasm32-wasip2/release/inject_id.wasm");
  assert.ok(existsSync(plugin), "build the plugins first");
  writeFileSync(join(dir, "courier.toml"), `
[server]
listen = "127.0.0.1:0"
data_dir = "data"
[[keys]]
token = "${TOKEN}"
scopes = ["ingest", "admin", "callback"]
[delivery]
allow_private_networks = true
schedule = ["0s", "100ms"]
jitter = 0.0
[[endpoints]]
name = "shop"
url = "${r}/shop"
secrets = ["${SECRET}"]
[[endpoints]]
name = "flaky"
url = "${r}/flaky"
secrets = ["${SECRET}"]
schedule = ["0s"]
[[plugins]]
name = "inject-id"
path = "${plugin}"
kind = "simulator"
[[workflows]]
name = "movies"
upstream = { url = "http://127.0.0.1:${upstream.address().port}/v1/chat" }
endpoint = "shop"
event_name = "new_movie_suggestion"
simulate = "inject-id"
simulate_delay = "3s"
`);
  courier = spawn(bin, ["serve", "--config", join(dir, "courier.toml")], { stdio: ["ignore", "pipe", "ignore"], env: { ...process.env, RUST_LOG: "warn" } });
  const lines = createInterface({ input: courier.stdout });
  base = await new Promise((ok, fail) => {
    lines.on("line", (l) => { if (l.startsWith("courier listening on ")) ok(l.slice("courier listening on ".length).trim()); });
    courier.on("exit", (c) => fail(new Error("courier exited " + c)));
  });
  for (let i = 0; i < 3; i++) await post("/v1/events", { event_type: "order.created", payload: { order: i }, endpoint: "shop" });
  for (let i = 0; i < 2; i++) await post("/v1/events", { event_type: "order.failed", payload: { order: 10 + i }, endpoint: "flaky" });
  await waitFor(() => received.filter((r) => r.path === "/flaky").length >= 2 && received.filter((r) => r.path === "/shop").length >= 3);
  browser = await chromium.launch({
    executablePath: chromePath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  courier?.kill("SIGTERM");
  receiver?.close();
  upstream?.close();
});

test("the console works end to end without JavaScript errors", async () => {
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  const shot = (name) => page.screenshot({ path: join(artifacts, name + ".png"), fullPage: true });

  // Sign in once; the token is kept for the tab.
  await page.goto(base + "/console");
  await page.getByLabel("Admin token", { exact: true }).fill(TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();

  // Deliveries: all five are listed, live.
  const rows = page.locator("#dl-rows tr[data-id]");
  await page.waitForFunction(() => document.querySelectorAll("#dl-rows tr[data-id]").length === 5);
  await shot("deliveries");
  // Filter: the dead ones only.
  await page.getByLabel("Status filter", { exact: true }).selectOption("dead");
  await page.getByRole("button", { name: "Apply" }).first().click();
  await page.waitForFunction(() => document.querySelectorAll("#dl-rows tr[data-id]").length === 2);
  for (const t of await page.locator("#dl-rows .pill").allTextContents()) assert.equal(t, "dead");
  await page.getByLabel("Endpoint filter", { exact: true }).fill("shop");
  await page.getByLabel("Status filter", { exact: true }).selectOption("");
  await page.getByRole("button", { name: "Apply" }).first().click();
  await page.waitForFunction(() => document.querySelectorAll("#dl-rows tr[data-id]").length === 3);
  // A delivery's page: request and attempt timeline.
  await rows.first().click();
  await page.getByRole("list", { name: "Attempts" }).waitFor();
  assert.match(await page.locator("#dl-detail").textContent(), /HTTP 200/);
  assert.match(await page.getByLabel("Request body", { exact: true }).textContent(), /"order"/);
  await shot("delivery");
  // Replay it from its page: the receiver gets it again.
  const shopBefore = received.filter((r) => r.path === "/shop").length;
  await page.getByRole("button", { name: "Replay", exact: true }).click();
  await page.getByText("Requeued.").waitFor();
  await waitFor(() => received.filter((r) => r.path === "/shop").length === shopBefore + 1);
  await page.getByLabel("Endpoint filter", { exact: true }).fill("");

  // DLQ: bulk replay with a confirmation showing the count; the receiver now accepts.
  await page.getByRole("tab", { name: "Dead letters" }).click();
  await page.waitForFunction(() => document.querySelectorAll("#dlq-rows td.mono").length === 2);
  await shot("dlq");
  flakyStatus = 200;
  const before = received.filter((r) => r.path === "/flaky").length;
  // Replay acts on the filter of the list shown, not on an edit that was never applied.
  await page.getByLabel("DLQ endpoint filter", { exact: true }).fill("flaky");
  await page.locator("#dlq-filter").getByRole("button", { name: "Apply" }).click();
  await page.waitForFunction(() => document.querySelectorAll("#dlq-rows td.mono").length === 2);
  await page.getByLabel("DLQ endpoint filter", { exact: true }).fill("someone-else");
  await page.getByRole("button", { name: /Replay all 2/ }).click();
  assert.match(await page.locator("#dlq-confirm-text").textContent(), /Requeue 2 dead deliveries/);
  await page.locator("#dlq-confirm-ok").click();
  await page.getByText("Requeued 2 deliveries.").waitFor();
  await waitFor(() => received.filter((r) => r.path === "/flaky").length >= before + 2);
  await page.waitForFunction(() => document.querySelectorAll("#dlq-rows td.mono").length === 0);

  // Endpoints: create one, see its secret once, send it a test event.
  await page.getByRole("tab", { name: "Endpoints" }).click();
  await page.getByLabel("New endpoint name", { exact: true }).fill("made-in-console");
  await page.getByLabel("New endpoint URL", { exact: true }).fill(`http://127.0.0.1:${receiver.address().port}/console-ep`);
  await page.getByRole("button", { name: "Create endpoint" }).click();
  await page.locator("#ep-secret").waitFor();
  assert.match(await page.locator("#ep-secret").textContent(), /^whsec_/);
  const row = page.locator("#ep-rows tr", { hasText: "made-in-console" });
  await row.getByRole("button", { name: "Send test" }).click();
  await page.getByText(/Test to made-in-console: HTTP 200/).waitFor();
  const test = received.find((r) => r.path === "/console-ep");
  assert.ok(test, "the endpoint created in the console received the test event");
  assert.equal(JSON.parse(test.body).type, "courier.test");
  // Pause and resume it; rotate its secret (the new one is shown once).
  await row.getByRole("button", { name: "Pause" }).click();
  await row.getByText("paused").waitFor();
  const paused = await (await fetch(base + "/v1/endpoints/made-in-console", { headers: { authorization: "Bearer " + TOKEN } })).json();
  assert.equal(paused.paused, true);
  await row.getByRole("button", { name: "Resume" }).click();
  await row.getByText("active").waitFor();
  await row.getByRole("button", { name: "Rotate secret" }).click();
  await page.getByText(/New secret for made-in-console/).waitFor();
  const rotated = await (await fetch(base + "/v1/endpoints/made-in-console", { headers: { authorization: "Bearer " + TOKEN } })).json();
  assert.equal(rotated.secrets.length, 2, "old and new secret sign during the overlap");
  // Edit its URL in place: a URL courier refuses shows the API's error and changes nothing;
  // a good one is saved and the next test event goes there.
  await row.getByRole("button", { name: "Edit URL" }).click();
  const urlInput = row.getByLabel("New URL for made-in-console");
  await urlInput.fill("ftp://127.0.0.1/nope");
  await row.getByRole("button", { name: "Save" }).click();
  await page.locator("#ep-msg .err").waitFor();
  // The browser logs the refused request (422) as a console error: expected here, and only here.
  const refused = errors.findIndex((e) => e.includes("422"));
  assert.ok(refused >= 0, "the refused URL was answered 422: " + errors.join(" | "));
  errors.splice(refused, 1);
  const unchanged = await (await fetch(base + "/v1/endpoints/made-in-console", { headers: { authorization: "Bearer " + TOKEN } })).json();
  assert.match(unchanged.url, /\/console-ep$/, "a refused URL is not stored");
  const newUrl = `http://127.0.0.1:${receiver.address().port}/console-ep-moved`;
  await urlInput.fill(newUrl);
  await row.getByRole("button", { name: "Save" }).click();
  await page.getByText(/URL of made-in-console changed/).waitFor();
  await row.getByText(newUrl).waitFor();
  await row.getByRole("button", { name: "Send test" }).click();
  await page.getByText(/Test to made-in-console: HTTP 200/).waitFor();
  assert.ok(received.find((r) => r.path === "/console-ep-moved"), "the test event went to the new URL");
  // A config-file endpoint can be paused and resumed from the console too, not edited.
  const shopRow = page.locator("#ep-rows tr").filter({ has: page.locator("td:first-child strong", { hasText: /^shop$/ }) });
  assert.equal(await shopRow.getByRole("button", { name: "Edit URL" }).count(), 0);
  await shopRow.getByRole("button", { name: "Pause" }).click();
  await shopRow.getByText("paused").waitFor();
  const shopPaused = await (await fetch(base + "/v1/endpoints/shop", { headers: { authorization: "Bearer " + TOKEN } })).json();
  assert.equal(shopPaused.paused, true);
  await shopRow.getByRole("button", { name: "Resume" }).click();
  await shopRow.getByText("active").waitFor();
  await shot("endpoints");

  // Analytics: charts per endpoint.
  await page.getByRole("tab", { name: "Analytics" }).click();
  await page.getByRole("img", { name: "Success rate by endpoint" }).waitFor();
  assert.ok((await page.locator("#an-charts svg").count()) >= 5);
  await shot("analytics");

  // Playground: a simulated event-driven workflow, watched over WebSocket to the end.
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("movies");
  // A request courier refuses is shown, not swallowed.
  const requestBody = page.getByLabel("Async request body");
  const goodBody = await requestBody.inputValue();
  await requestBody.fill("[]");
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-status", { hasText: "JSON object" }).waitFor();
  // The browser logs the refused request itself; that one is expected.
  const badRequest = errors.findIndex((e) => /status of 400/.test(e));
  assert.ok(badRequest >= 0, errors.join(" | "));
  errors.splice(badRequest, 1);
  await requestBody.fill(goodBody);
  await page.getByRole("button", { name: "Send async request" }).click();
  // The simulated backend answers 3 s after "AI generated": time for the socket, however
  // late it opens, to see that step before the last.
  await page.locator("#pg-steps li", { hasText: "success" }).waitFor({ timeout: 30000 });
  const steps = await page.locator("#pg-steps li").allTextContents();
  assert.ok(steps.some((s) => s.includes("AI generated")), steps.join(" | "));
  assert.match(await page.getByLabel("Result data", { exact: true }).textContent(), /"id": "sim_/);
  assert.match(await page.getByLabel("AI response", { exact: true }).textContent(), /"title": "Arrival"/);
  assert.ok(await page.locator("#pg-callback").isHidden(), "no manual callback for a simulated workflow");
  // The channel was watched over a socket whose URL carries no token (it goes as a protocol).
  assert.ok(sockets.length > 0, "no WebSocket was opened");
  for (const u of sockets) assert.ok(!u.includes(TOKEN) && !u.includes("token="), u);
  await shot("playground");

  assert.deepEqual(errors, [], "no JavaScript errors");
  await page.close();
});
