-- Creates a session, or takes the lease of the live one under the same name.
-- ARGV: 1 new session JSON  2 holder  3 lease until  4 now  5 max_open  6 committed_size
--       7 complete ('1'/'0')  8 expire_time  9 grace (ms)  10 digest
-- Returns {'created'} | {'existing', state JSON} | {'busy'} | {'too_many'}
--   | {'retire', state JSON of the expired, unfinished session in the way}.
local now = tonumber(ARGV[4])
local found = redis.call('HMGET', K_SESSION, 'state', 'expire', 'complete')
if found[1] and tonumber(found[2]) > now then
  if found[3] ~= '1' then
    if held_by_another(ARGV[2], now) then
      return {'busy'}
    end
    redis.call('HSET', K_SESSION, 'holder', ARGV[2], 'until', ARGV[3])
  end
  return {'existing', found[1]}
end
-- Expired sessions count no more (the janitor finds them through the global index).
redis.call('ZREMRANGEBYSCORE', K_OPEN, '-inf', int(now))
if ARGV[7] ~= '1' and redis.call('ZCARD', K_OPEN) >= tonumber(ARGV[5]) then
  return {'too_many'}
end
-- An expired session under the same name is replaced; an unfinished one is first kept under
-- another name (upload_retire.lua), so its staged bytes still reach the janitor.
if found[1] and found[3] ~= '1' then
  return {'retire', found[1]}
end
redis.call('DEL', K_SESSION)
store(ARGV[1], ARGV[2], ARGV[3], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
return {'created'}
