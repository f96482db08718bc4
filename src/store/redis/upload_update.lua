-- Replaces the session's state if the caller holds its lease and does not go back.
-- ARGV: 1 session JSON  2 holder  3 lease until  4 committed_size  5 complete ('1'/'0')
--       6 expire_time  7 grace (ms)  8 digest
-- Returns {'updated', previous expire_time} | {'lease_lost'}.
local stored = redis.call('HMGET', K_SESSION, 'committed', 'expire')
if not stored[1] or not held_by(ARGV[2]) then
  return {'lease_lost'}
end
if tonumber(ARGV[4]) < tonumber(stored[1]) then
  return {'lease_lost'}
end
local holder, lease_until = ARGV[2], ARGV[3]
if ARGV[5] == '1' then
  -- A complete session has no writer.
  holder, lease_until = '', '0'
end
store(ARGV[1], holder, lease_until, ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return {'updated', stored[2]}
