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
// The binary `cargo test` built: under CARGO_TARGET_DIR when that is set.
const targetDir = process.env.CARGO_TARGET_DIR ? resolve(root, process.env.CARGO_TARGET_DIR) : join(root, "target");
const bin = process.env.COURIER_BIN || join(targetDir, "debug/courier");
const chromePath = process.env.CHROMIUM || "/usr/bin/chromium";
const artifacts = join(here, "artifacts");
const TOKEN = "console-test-admin-token-01";
// Keys short of a scope: the console's own pages need admin, the Playground ingest and callback.
const ADMIN_ONLY = "console-test-admin-only-token-02";
const NO_CALLBACK = "console-test-no-callback-token-03";
const SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

let receiver, upstream, courier, base, browser;
const received = [];
let flakyStatus = 500;
// Receiver paths that answer 500 for now.
const down = new Set();

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
      res.writeHead(down.has(req.url) ? 500 : req.url.startsWith("/flaky") ? flakyStatus : 200).end("ok");
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
[[keys]]
token = "${ADMIN_ONLY}"
scopes = ["admin"]
[[keys]]
token = "${NO_CALLBACK}"
scopes = ["admin", "ingest"]
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
[[workflows]]
name = "by-hand"
upstream = { url = "http://127.0.0.1:${upstream.address().port}/v1/chat" }
endpoint = "shop"
event_name = "new_movie_suggestion"
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
  await page.getByLabel("API token", { exact: true }).fill(TOKEN);
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
  await page.locator("#pg-msg", { hasText: "JSON object" }).waitFor();
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

// A page signed in with `key`, and the uncaught errors of its script.
async function signIn(key = TOKEN) {
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/console");
  await page.getByLabel("API token", { exact: true }).fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#app").waitFor();
  return { page, errors };
}
const shotOf = (page, name) => page.screenshot({ path: join(artifacts, name + ".png"), fullPage: true });
const rowTexts = (page, sel) => page.locator(sel).evaluateAll((trs) => trs.map((tr) => tr.textContent));

test("live refresh and a DLQ reload keep to the applied filter, not to unapplied edits", async () => {
  const { page, errors } = await signIn();
  await page.getByLabel("Endpoint filter", { exact: true }).fill("flaky");
  await page.getByRole("button", { name: "Apply" }).first().click();
  await page.waitForFunction(() => [...document.querySelectorAll("#dl-rows tr[data-id] td:nth-child(2)")].every((td) => td.textContent === "flaky")
    && document.querySelectorAll("#dl-rows tr[data-id]").length >= 2);
  const applied = await rowTexts(page, "#dl-rows tr[data-id]");
  // Typed, not applied: two live refreshes later the list is still the applied one.
  await page.getByLabel("Endpoint filter", { exact: true }).fill("shop");
  // (The first refresh has been shown by the time the second is sent, 2 s later.)
  for (let i = 0; i < 2; i++) await page.waitForRequest((r) => r.url().includes("/v1/deliveries?"));
  const cells = await page.locator("#dl-rows tr[data-id] td:nth-child(2)").allTextContents();
  assert.ok(cells.length >= 2 && cells.every((c) => c === "flaky"), "still the applied filter: " + cells.join(", "));
  assert.equal((await rowTexts(page, "#dl-rows tr[data-id]")).length, applied.length);

  // Dead letters of two endpoints; the list shows one of them, the form is then edited to
  // "all" without applying; after the bulk replay the list is reloaded with the applied filter.
  for (const name of ["dlq-a", "dlq-b"]) {
    down.add("/" + name);
    const r = await fetch(base + "/v1/endpoints", { method: "POST", headers: { authorization: "Bearer " + TOKEN, "content-type": "application/json" }, body: JSON.stringify({ name, url: `http://127.0.0.1:${receiver.address().port}/${name}` }) });
    assert.equal(r.status, 201, await r.text());
    await post("/v1/events", { event_type: "order.lost", payload: { to: name }, endpoint: name });
  }
  const dead = async (name) => (await (await fetch(`${base}/v1/dlq?endpoint=${name}`, { headers: { authorization: "Bearer " + TOKEN } })).json()).data.length;
  for (const name of ["dlq-a", "dlq-b"]) {
    const deadline = Date.now() + 15000;
    while ((await dead(name)) === 0) { assert.ok(Date.now() < deadline, name + " never dead"); await new Promise((ok) => setTimeout(ok, 50)); }
  }
  await page.getByRole("tab", { name: "Dead letters" }).click();
  await page.getByLabel("DLQ endpoint filter", { exact: true }).fill("dlq-a");
  await page.locator("#dlq-filter").getByRole("button", { name: "Apply" }).click();
  await page.waitForFunction(() => { const r = [...document.querySelectorAll("#dlq-rows tr")]; return r.length === 1 && r[0].textContent.includes("dlq-a"); });
  await page.getByLabel("DLQ endpoint filter", { exact: true }).fill("");
  down.delete("/dlq-a");
  await page.getByRole("button", { name: /Replay all 1/ }).click();
  await page.locator("#dlq-confirm-ok").click();
  await page.getByText("Requeued 1 deliveries.").waitFor();
  await page.waitForFunction(() => !document.querySelector("#dlq-rows").textContent.includes("dlq-a"));
  const dlqRows = await rowTexts(page, "#dlq-rows tr");
  assert.ok(!dlqRows.some((t) => t.includes("dlq-b")), "dlq-b was never applied: " + dlqRows.join(" | "));
  assert.match(dlqRows.join(" "), /The dead-letter queue is empty/);
  assert.deepEqual(errors, []);
  await page.close();
});

test("a refusal for want of a scope names the scope the Playground action needs", async () => {
  const { page, errors } = await signIn(ADMIN_ONLY);
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); d.dismiss(); });
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("movies");
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-msg", { hasText: "needs a token with the `ingest` scope" }).waitFor();
  assert.equal(await page.locator("#pg-status").textContent(), "refused");
  await page.getByRole("button", { name: "Sign out" }).click();
  // The sign-in says which scopes are needed for what.
  assert.match(await page.locator("#login").textContent(), /admin.*ingest.*callback/s);

  // A key that may send requests but not callbacks: the callback form says so, in the page.
  await page.getByLabel("API token", { exact: true }).fill(NO_CALLBACK);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("by-hand");
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-steps li", { hasText: "AI generated" }).waitFor({ timeout: 15000 });
  await page.getByRole("button", { name: "Send callback" }).click();
  await page.locator("#pg-cb-msg", { hasText: "needs a token with the `callback` scope" }).waitFor();
  assert.deepEqual(dialogs, [], "no alert");
  assert.deepEqual(errors, []);
  await page.close();
});

test("a new Playground request starts from a clean status, and a socket that fails shows it", async () => {
  const { page, errors } = await signIn();
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("movies");
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-status", { hasText: "success" }).waitFor({ timeout: 30000 });
  // The next request is held, then answered with a socket URL courier refuses (no such channel).
  let release;
  const held = new Promise((ok) => (release = ok));
  await page.route("**/v1/ai/async", async (route) => {
    await held;
    const response = await route.fetch();
    const json = await response.json();
    await route.fulfill({ response, json: { ...json, ws_url: "/v1/channels/no-such-channel/ws" } });
  });
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-status", { hasText: "sending" }).waitFor();
  assert.equal(await page.locator("#pg-steps li").count(), 0);
  assert.equal(await page.getByLabel("Result data", { exact: true }).textContent(), "—");
  release();
  await page.locator("#pg-status", { hasText: "connection lost" }).waitFor();
  assert.deepEqual(errors, []);
  await page.close();
});

test("a failed request shows its error in the tab instead of a blank or stale one", async () => {
  const { page, errors } = await signIn();
  let failing = false;
  const fail = (route) => route.fulfill({ status: 503, json: { error: { code: "unavailable", message: "courier is shutting down" } } });
  await page.route((u) => /\/v1\/(dlq|endpoints|workflows|deliveries\/[^/?]+$|stats\?)/.test(u.pathname + u.search), (route) => (failing ? fail(route) : route.continue()));
  // A delivery's page.
  await page.locator("#dl-rows tr[data-id]").first().waitFor();
  failing = true;
  await page.locator("#dl-rows tr[data-id]").first().click();
  await page.locator("#dl-detail", { hasText: "courier is shutting down" }).waitFor();
  // Dead letters: listed, then a reload fails: the old rows go, and nothing can be replayed.
  failing = false;
  await page.getByRole("tab", { name: "Dead letters" }).click();
  await page.locator("#dlq-rows tr").first().waitFor();
  failing = true;
  await page.locator("#dlq-filter").getByRole("button", { name: "Apply" }).click();
  await page.locator("#dlq-rows", { hasText: "courier is shutting down" }).waitFor();
  assert.equal(await page.locator("#dlq-rows tr").count(), 1);
  assert.ok(await page.locator("#dlq-replay").isDisabled());
  for (const [tab, panel] of [["Analytics", "#tab-analytics"], ["Endpoints", "#tab-endpoints"], ["Playground", "#tab-playground"]]) {
    await page.getByRole("tab", { name: tab }).click();
    await page.locator(panel, { hasText: "courier is shutting down" }).waitFor();
  }
  assert.deepEqual(errors, [], "no uncaught errors");
  await page.close();
});

test("an error page from a proxy shows its HTTP status and text, not a JSON parse error", async () => {
  const { page, errors } = await signIn();
  await page.route("**/v1/deliveries?*", (route) => route.fulfill({
    status: 502, contentType: "text/html",
    body: "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>",
  }));
  await page.locator("#dl-rows", { hasText: "HTTP 502" }).waitFor();
  const shown = await page.locator("#dl-rows").textContent();
  assert.match(shown, /502 Bad Gateway nginx/);
  assert.doesNotMatch(shown, /SyntaxError|JSON/);
  assert.deepEqual(errors, []);
  await page.close();
});

test("sign-out closes the Playground's socket and leaves nothing of the session", async () => {
  const { page, errors } = await signIn();
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("movies");
  const opened = page.waitForEvent("websocket");
  await page.getByRole("button", { name: "Send async request" }).click();
  const ws = await opened;
  // The simulated callback comes 3 s after this step: the channel is still open.
  await page.locator("#pg-steps li", { hasText: "AI generated" }).waitFor({ timeout: 15000 });
  const closed = ws.waitForEvent("close", { timeout: 2000 });
  await page.getByRole("button", { name: "Sign out" }).click();
  await closed;
  await page.getByLabel("API token", { exact: true }).fill(TOKEN);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.waitForTimeout(4000); // past the simulated callback
  assert.equal(await page.locator("#pg-steps li").count(), 0);
  assert.equal(await page.locator("#pg-channel").textContent(), "—");
  assert.equal(await page.getByLabel("Result data", { exact: true }).textContent(), "—");
  assert.deepEqual(errors, []);
  await page.close();
});

// The Playground's channel sockets, routed through the test: `close(n, message)` says with
// which code (if any) courier "closes" the n-th socket once it has forwarded `message`.
const CHANNEL_WS = /\/v1\/channels\/[^/]+\/ws$/;
async function routeChannelSockets(page, close) {
  const sockets = [];
  await page.routeWebSocket(CHANNEL_WS, (ws) => {
    const n = sockets.length;
    sockets.push({ url: ws.url(), openedAt: Date.now(), closedAt: null });
    const server = ws.connectToServer();
    server.onMessage((m) => {
      ws.send(m);
      const code = close(n, JSON.parse(m));
      if (code && !sockets[n].closedAt) {
        sockets[n].closedAt = Date.now();
        ws.close({ code, reason: `closed by the test with ${code}` });
        server.close();
      }
    });
  });
  return sockets;
}
// Every text the Playground's status shows, in order.
const recordStatus = (page) => page.evaluate(() => {
  window.statuses = [];
  new MutationObserver(() => window.statuses.push(document.querySelector("#pg-status").textContent))
    .observe(document.querySelector("#pg-status"), { childList: true, characterData: true, subtree: true });
});

test("a socket courier closes before the final message (1011, 1001) is opened again to the same channel, and the result still shows", async () => {
  const { page, errors } = await signIn();
  // The first two sockets are closed once they have given "AI generated"; the third stays.
  const codes = [1011, 1001];
  const sockets = await routeChannelSockets(page, (n, m) => m.status === "ai_generated" && codes[n]);
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("by-hand");
  await recordStatus(page);
  await page.getByRole("button", { name: "Send async request" }).click();
  // The callback form shows only once a socket that stays has given "AI generated".
  await page.locator("#pg-callback").waitFor({ state: "visible" });
  await waitFor(() => sockets.length >= 3);
  await page.getByRole("button", { name: "Send callback" }).click();
  await page.locator("#pg-status", { hasText: "success" }).waitFor();
  const channel = await page.locator("#pg-channel").textContent();
  for (const s of sockets) assert.ok(s.url.endsWith(`/v1/channels/${channel}/ws`), s.url);
  assert.equal(sockets.length, 3, "one socket per close, no more");
  // The delay grows: 0.5 s after the first close, 1 s after the second.
  assert.ok(sockets[1].openedAt - sockets[0].closedAt >= 450, `${sockets[1].openedAt - sockets[0].closedAt} ms`);
  assert.ok(sockets[2].openedAt - sockets[1].closedAt >= 950, `${sockets[2].openedAt - sockets[1].closedAt} ms`);
  const statuses = await page.evaluate(() => window.statuses);
  assert.ok(statuses.includes("reconnecting… (1 of 6)") && statuses.includes("reconnecting… (2 of 6)"), statuses.join(" | "));
  assert.ok(!statuses.includes("connection lost"), statuses.join(" | "));
  // The latest state each new socket gets first is not shown twice.
  const steps = await page.locator("#pg-steps li").allTextContents();
  assert.equal(steps.filter((s) => s.includes("AI generated")).length, 1, steps.join(" | "));
  assert.equal(steps.filter((s) => s.includes("success")).length, 1, steps.join(" | "));
  assert.equal(await page.locator("#pg-msg").textContent(), "");
  assert.match(await page.getByLabel("Result data", { exact: true }).textContent(), /"saved": true/);
  assert.deepEqual(errors, []);
  await shotOf(page, "playground-reconnected");
  await page.close();
});

test("a socket closed with 1008 says the token is no longer admitted, and is not opened again", async () => {
  const { page, errors } = await signIn();
  const sockets = await routeChannelSockets(page, (n, m) => m.status === "ai_generated" && 1008);
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("by-hand");
  await page.getByRole("button", { name: "Send async request" }).click();
  await page.locator("#pg-status", { hasText: "not admitted" }).waitFor();
  assert.match(await page.locator("#pg-msg").textContent(), /no longer admits this token.*closed by the test with 1008/s);
  await page.waitForTimeout(1000); // twice the first reconnect's delay
  assert.equal(sockets.length, 1);
  assert.equal(await page.locator("#pg-status").textContent(), "not admitted");
  assert.ok(await page.locator("#app").isVisible(), "still signed in: the next request says what the token may do");
  assert.deepEqual(errors, []);
  await page.close();
});

test("a reconnect waiting to happen is dropped by a new Playground request and by sign-out", async () => {
  const { page, errors } = await signIn();
  // Time stands still until the test moves it: the reconnect delays are waited for on cue.
  await page.clock.install();
  await page.clock.pauseAt(Date.now() + 1000);
  // Every socket is closed once it has given "AI generated": 1001, then 1011.
  const sockets = await routeChannelSockets(page, (n, m) => m.status === "ai_generated" && (n % 2 ? 1011 : 1001));
  const channels = () => sockets.map((s) => s.url.match(/channels\/([^/]+)\/ws$/)[1]);
  await page.getByRole("tab", { name: "Playground" }).click();
  await page.getByLabel("Workflow", { exact: true }).selectOption("by-hand");
  const send = page.getByRole("button", { name: "Send async request" });
  await send.click();
  await page.locator("#pg-status", { hasText: "reconnecting" }).waitFor();
  const a = await page.locator("#pg-channel").textContent();
  // A new request while channel A waits to reconnect: only the new channel B is watched.
  await send.click();
  await page.locator("#pg-channel", { hasText: /^(?!—)/ }).filter({ hasNotText: a }).waitFor();
  const b = await page.locator("#pg-channel").textContent();
  await page.locator("#pg-status", { hasText: "reconnecting" }).waitFor();
  await page.clock.runFor(500);
  await waitFor(() => sockets.length >= 3);
  await page.locator("#pg-status", { hasText: "reconnecting… (2 of 6)" }).waitFor();
  assert.deepEqual(channels(), [a, b, b]);
  // Signed out while B waits a second for its next try: no socket comes after.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.clock.runFor(60000);
  await page.waitForTimeout(300);
  assert.deepEqual(channels(), [a, b, b]);
  assert.equal(await page.locator("#pg-status").textContent(), "");
  assert.deepEqual(errors, []);
  await page.close();
});

// Last: it adds many endpoints.
test("endpoints are listed a page at a time, with a control for the next page", async () => {
  for (let i = 0; i < 110; i++) {
    const name = "page-" + String(i).padStart(3, "0");
    const r = await fetch(base + "/v1/endpoints", { method: "POST", headers: { authorization: "Bearer " + TOKEN, "content-type": "application/json" }, body: JSON.stringify({ name, url: `http://127.0.0.1:${receiver.address().port}/${name}` }) });
    assert.equal(r.status, 201, await r.text());
  }
  const { page, errors } = await signIn();
  await page.getByRole("tab", { name: "Endpoints" }).click();
  await page.getByRole("button", { name: "Show more endpoints" }).waitFor();
  assert.equal(await page.locator("#ep-rows tr").count(), 100);
  assert.match(await page.locator("#ep-more-bar").textContent(), /first 100 endpoints/);
  const last = page.locator("#ep-rows tr").filter({ has: page.locator("td:first-child strong", { hasText: /^page-109$/ }) });
  assert.equal(await last.count(), 0);
  await shotOf(page, "endpoints-paged");
  await page.getByRole("button", { name: "Show more endpoints" }).click();
  await last.waitFor();
  assert.ok(await page.locator("#ep-more-bar").isHidden(), "all listed");
  const total = await page.locator("#ep-rows tr").count();
  assert.ok(total > 100);
  // An action on the second page keeps it listed.
  await last.getByRole("button", { name: "Pause" }).click();
  await last.getByText("paused").waitFor();
  assert.equal(await page.locator("#ep-rows tr").count(), total);
  assert.deepEqual(errors, []);
  await page.close();
});
