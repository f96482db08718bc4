-- The live session, with its lease taken unless it is complete.
-- ARGV: 1 holder  2 lease until  3 now
-- Returns {'none'} | {'found', state JSON} | {'busy'}.
local now = tonumber(ARGV[3])
local found = redis.call('HMGET', K_SESSION, 'state', 'expire', 'complete')
if not found[1] or tonumber(found[2]) <= now then
  return {'none'}
end
if found[3] ~= '1' then
  if held_by_another(ARGV[1], now) then
    return {'busy'}
  end
  redis.call('HSET', K_SESSION, 'holder', ARGV[1], 'until', ARGV[2])
end
return {'found', found[1]}
