-- wrk script: a fresh W3C traceparent (sampled) on every request, and a JSON summary line.
-- Every variant gets the same requests; MLflow's manual API needs the header to be present.

local format, random = string.format, math.random

init = function(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

local function hex(groups)
  local parts = {}
  for i = 1, groups do
    parts[i] = format("%04x", random(0, 65535))
  end
  return table.concat(parts)
end

request = function()
  local traceparent = "00-" .. hex(8) .. "-" .. hex(4) .. "-01"
  return wrk.format(nil, nil, { ["traceparent"] = traceparent })
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "non2xx": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
