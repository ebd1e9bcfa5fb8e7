-- wrk script for cpis-bridge benchmarks: every request takes the next line of this thread's share of BENCH_LIST
-- and carries a TraceID unique across runs (BENCH_RUN); distinct event ids so no access is an idempotent repeat.
-- BENCH_MODE: "get" (lines are paths) or "encounter" (lines are NHS numbers; POST /fhir/Encounter bodies with a
-- distinct identifier each). BENCH_AUTH: the Authorization header value (may be empty).
-- With BENCH_TOTAL set, each thread stops after its share of that many responses (the memory-case walk) and
-- writes the file BENCH_DONE.<thread> so the harness can interrupt wrk (SIGINT makes it print its summary).
local counter = 0
local threads = {}

function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
  mode = os.getenv("BENCH_MODE") or "get"
  run = os.getenv("BENCH_RUN") or "r"
  repeats = tonumber(os.getenv("BENCH_REPEAT") or "1")
  local auth = os.getenv("BENCH_AUTH") or ""
  lines = {}
  local i = 0
  for line in io.lines(os.getenv("BENCH_LIST")) do
    if i % nthreads == tid - 1 then lines[#lines + 1] = line end
    i = i + 1
  end
  local total = tonumber(os.getenv("BENCH_TOTAL") or "0")
  limit = 0
  if total > 0 then limit = #lines * repeats end
  idx, rep, seq, got = 1, 0, 0, 0
  headers = {}
  if auth ~= "" then headers["Authorization"] = auth end
  if mode == "encounter" then
    headers["Content-Type"] = "application/fhir+json"
    headers["Accept"] = "application/fhir+json"
  elseif mode == "get" and auth ~= "" then
    headers["Accept"] = "application/fhir+json"
    headers["IsUnscheduledAccessEvent"] = os.getenv("BENCH_UNSCHEDULED") or "true"
  end
end

local function next_line()
  local line = lines[idx]
  rep = rep + 1
  if rep >= repeats then
    rep = 0
    idx = idx % #lines + 1
  end
  return line
end

local ENC = '{"resourceType":"Encounter","status":"in-progress",' ..
  '"identifier":[{"system":"https://bench.cpis-bridge.example/encounter-id","value":"%s"}],' ..
  '"class":{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"EMER","display":"emergency"},' ..
  '"subject":{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"%s"}},' ..
  '"period":{"start":"%s"}}'

function request()
  seq = seq + 1
  if limit > 0 and seq > limit then return wrk.format("GET", "/healthz") end
  local id = run .. "-" .. tid .. "-" .. seq
  headers["TraceID"] = id
  local line = next_line()
  if mode == "encounter" then
    local body = string.format(ENC, id, line, os.date("!%Y-%m-%dT%H:%M:%SZ"))
    return wrk.format("POST", "/fhir/Encounter", headers, body)
  end
  return wrk.format("GET", line, headers)
end

if os.getenv("BENCH_TOTAL") then
  function response(status, hdrs, body)
    got = got + 1
    if got == limit then
      -- wrk's main thread sleeps for the whole -d: tell the harness (it interrupts wrk), then stop this thread
      local done = io.open(os.getenv("BENCH_DONE") .. "." .. tid, "w")
      if done then done:close() end
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
