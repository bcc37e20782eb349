-- wrk script for the ingest scenario: POST one JSON event per request, each with its own
-- Idempotency-Key, so every request is a new message for Courier (not a duplicate answered 200).
-- BENCH_KEY_PREFIX (env) keeps keys unique across runs; the thread number keeps them unique across threads.

local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local counter = 0
local prefix = os.getenv("BENCH_KEY_PREFIX") or tostring(os.time())

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"type": "service.completed", "data": {"service": "US-ABD", "patient": "P123"}}'
end

function request()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = prefix .. "-" .. tid .. "-" .. counter
  return wrk.format()
end
