// A Node service instrumented the standard OpenTelemetry JS way: sdk-node, instrumentation-http,
// the default W3C propagators, OTLP/HTTP protobuf to the MLflow server, all from OTEL_* variables
// (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_HEADERS, OTEL_SERVICE_NAME,
// OTEL_BSP_SCHEDULE_DELAY). Every request is relayed to RELAY_TO (same method, path and body);
// it answers with the callee's status and body, plus the baggage it received as `x-seen-baggage`.
// `GET /health` answers itself, untraced.
"use strict";
const { NodeSDK } = require("@opentelemetry/sdk-node");
const { HttpInstrumentation } = require("@opentelemetry/instrumentation-http");
const { OTLPTraceExporter } = require("@opentelemetry/exporter-trace-otlp-proto");

const sdk = new NodeSDK({
  traceExporter: new OTLPTraceExporter(),
  // Readiness probes stay out of the traces.
  instrumentations: [new HttpInstrumentation({ ignoreIncomingRequestHook: (r) => r.url === "/health" })],
});
sdk.start();

const http = require("http"); // after start(): the instrumentation patches it on require

const target = new URL(process.env.RELAY_TO);
const server = http.createServer((request, response) => {
  if (request.url === "/health") {
    response.end("ok");
    return;
  }
  const chunks = [];
  request.on("data", (chunk) => chunks.push(chunk));
  request.on("end", () => {
    const body = Buffer.concat(chunks);
    const call = http.request(
      {
        host: target.hostname,
        port: target.port,
        path: request.url,
        method: request.method,
        headers: { "content-type": request.headers["content-type"] || "application/json" },
      },
      (answer) => {
        const parts = [];
        answer.on("data", (chunk) => parts.push(chunk));
        answer.on("end", () => {
          response.writeHead(answer.statusCode, {
            "content-type": answer.headers["content-type"] || "application/json",
            "x-seen-baggage": request.headers["baggage"] || "",
          });
          response.end(Buffer.concat(parts));
        });
      },
    );
    call.on("error", () => {
      response.writeHead(502);
      response.end();
    });
    call.end(body);
  });
});

server.listen(Number(process.env.PORT), "127.0.0.1", () => console.log("listening"));

function stop() {
  server.close();
  sdk.shutdown().finally(() => process.exit(0)); // flushes the spans still batched
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
