#!lua flags=no-writes
-- KEYS: 1 meta, 2 events
-- ARGV: 1 after (exclusive), 2 limit
-- Returns {trimmed_through, event members...} (oldest first).
local out = {redis.call('HGET', KEYS[1], 'trimmed_through') or '0'}
if tonumber(ARGV[2]) > 0 then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])) do
    out[#out + 1] = member
  end
end
return out
