#!lua flags=no-writes
-- KEYS: 1 msgs, 2 msg
-- ARGV: 1 upper bound ('+inf' or '(N'), 2 limit
-- Returns stored messages "<seq>:<create_time_ms>:<json>", newest first.
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[1], '-inf', 'LIMIT', 0, ARGV[2])
local out = {}
-- In chunks: unpack() of thousands of ids would overflow Lua's stack.
for i = 1, #ids, 500 do
  local chunk = {unpack(ids, i, math.min(i + 499, #ids))}
  for _, stored in ipairs(redis.call('HMGET', KEYS[2], unpack(chunk))) do
    if stored then
      out[#out + 1] = stored
    end
  end
end
return out
