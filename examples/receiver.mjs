// A webhook receiver that verifies both of courier's signatures, with Node's built-in
// crypto only (no packages):
//
//   WEBHOOK_SECRET=whsec_... node examples/receiver.mjs --port 9000
//
// Answers 204 when both signatures are valid, 400 otherwise; prints one JSON line per request.
import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";

const secret = process.env.WEBHOOK_SECRET;
if (!secret) {
  console.error("receiver.mjs: set WEBHOOK_SECRET to the endpoint's secret (whsec_...)");
  process.exit(1);
}
const portArg = process.argv.indexOf("--port");
const port = portArg > 0 ? Number(process.argv[portArg + 1]) : 9000;

function safeEqual(a, b) {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

// Standard Webhooks: v1,base64(HMAC-SHA256(base64decode(secret minus "whsec_"), "id.ts.body")).
function standardOk(headers, body) {
  const id = headers["webhook-id"];
  const ts = headers["webhook-timestamp"];
  const sigs = headers["webhook-signature"] || "";
  if (!id || !ts || Math.abs(Date.now() / 1000 - Number(ts)) > 300) return false;
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  const expected =
    "v1," + createHmac("sha256", key).update(`${id}.${ts}.`).update(body).digest("base64");
  return sigs.split(" ").some((s) => safeEqual(s, expected));
}

// mr-signature: hex HMAC-SHA256 of the raw body keyed with the whole secret text.
function mrOk(headers, body) {
  const expected = createHmac("sha256", secret).update(body).digest("hex");
  return (headers["mr-signature"] || "").split(",").some((s) => safeEqual(s.trim(), expected));
}

const server = createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const standard = standardOk(req.headers, body);
    const mr = mrOk(req.headers, body);
    const verified = standard && mr;
    console.log(JSON.stringify({ webhook_id: req.headers["webhook-id"], standard, mr, verified }));
    res.writeHead(verified ? 204 : 400).end();
  });
});
server.listen(port, "127.0.0.1", () => {
  console.log(`receiver listening on http://127.0.0.1:${server.address().port}`);
});
