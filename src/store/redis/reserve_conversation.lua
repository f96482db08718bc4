-- Reserves a user's place in a conversation they are about to join, in their own slot, so the
-- cap on conversations per user holds however many requests name them at once.
-- KEYS: 1 P:{u:USER}:convs
-- ARGV: 1 conversation id, 2 the cap
-- Returns {'present'} (already listed: nothing to reserve) | {'full'} | {'reserved'} (listed
-- now, scored with the current time until the join's own time replaces it).
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {'present'}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return {'full'}
end
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], now[1] * 1000 + math.floor(now[2] / 1000), ARGV[1])
return {'reserved'}
