-- wrk script for bench/chain: every connection POSTs a body of BENCH_BODY_BYTES, reads the answer, then thinks for a
-- uniform random time in [BENCH_THINK_MIN_MS, BENCH_THINK_MAX_MS] before its next request.
--
-- wrk starts a request's latency clock when it writes the request, after delay() has elapsed (wrk.c socket_writeable
-- sets c->start once c->delayed is cleared), so the reported latency excludes the think time.
-- Configuration comes from the environment because wrk evaluates this file in its main Lua state too, and only a
-- top-level definition of delay() there turns think time on (BENCH_THINK_MAX_MS=0 means saturation: no delay()).
-- BENCH_HEADERS holds extra request headers, one "name: value" per line (kept off the command line on purpose).
-- BENCH_SEED seeds the think times: runs with the same seed draw the same sequence, so a throughput ratio between two
-- chains measures the chains rather than the luck of two random draws.

local function env_number(name, default)
   local value = tonumber(os.getenv(name) or "")
   if value == nil then return default end
   return value
end

local body_bytes = env_number("BENCH_BODY_BYTES", 1024)
local think_min = env_number("BENCH_THINK_MIN_MS", 500)
local think_max = env_number("BENCH_THINK_MAX_MS", 1500)
local seed = env_number("BENCH_SEED", 1)

wrk.method = "POST"
wrk.body = string.rep("x", body_bytes)
wrk.headers["Content-Type"] = "application/octet-stream"
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
   local name, value = line:match("^%s*([^:]+):%s*(.-)%s*$")
   if name then wrk.headers[name] = value end
end

local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("thread_id", counter)
end

function init(args)
   -- Each thread has its own Lua state: seed each differently so their think times are not in lockstep.
   math.randomseed(seed * 1000 + (thread_id or 0))
end

if think_max > 0 then
   function delay()
      return math.random(think_min, think_max)
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local parts = {
      string.format('"duration_us":%d', summary.duration),
      string.format('"requests":%d', summary.requests),
      string.format('"bytes":%d', summary.bytes),
      string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                    e.connect, e.read, e.write, e.status, e.timeout),
      string.format('"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d}',
                    latency.min, latency.mean, latency.max, latency.stdev,
                    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0)),
      string.format('"think_ms":[%d,%d]', think_min, think_max),
   }
   io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
