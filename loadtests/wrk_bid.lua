-- wrk script: every connection POSTs one bid request (tmax 50) in a closed loop, and the
-- summary counts bids (200), no-bids (204) and anything else, and the unanswered (timeouts).
--   WRK_BODY=request.json wrk -t2 -c256 -d6s --timeout 2s --latency \
--       -s loadtests/wrk_bid.lua http://127.0.0.1:PORT/openrtb2/bid
-- (docs/tuning.md, "Overload", says how the figures there were taken.)
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local f = assert(io.open(os.getenv("WRK_BODY") or "request.json", "rb"))
  wrk.body = f:read("*a"); f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  s200, s204, other = 0, 0, 0
end
function response(status, headers, body)
  if status == 200 then s200 = s200 + 1 elseif status == 204 then s204 = s204 + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("s200"); b = b + t:get("s204"); c = c + t:get("other") end
  io.write(string.format("bids %d  no-bids %d  other %d  unanswered (timeouts) %d\n",
                         a, b, c, summary.errors.timeout))
end
