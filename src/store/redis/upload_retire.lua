-- Moves an expired, unfinished session to its retired name (same slot), where the janitor finds
-- it, unless it changed since it was read.
-- KEYS: 3 the retired name's session HASH
-- ARGV: 1 state JSON as read  2 the state under its retired name  3 committed_size
--       4 expire_time  5 grace (ms)  6 digest of the session's own name
-- Returns {'retired'} | {'changed'}.
local K_RETIRED = KEYS[3]
if redis.call('HGET', K_SESSION, 'state') ~= ARGV[1] then
  return {'changed'}
end
redis.call('HSET', K_RETIRED, 'state', ARGV[2], 'holder', '', 'until', '0',
  'committed', ARGV[3], 'complete', '0', 'expire', ARGV[4])
redis.call('PEXPIREAT', K_RETIRED, int(tonumber(ARGV[4]) + tonumber(ARGV[5])))
redis.call('DEL', K_SESSION)
redis.call('ZREM', K_OPEN, ARGV[6])
return {'retired'}
