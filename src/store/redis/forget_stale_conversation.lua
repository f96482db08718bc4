-- Drops a user's conversation index entry that a listing found stale (the user is not a
-- participant: a reservation whose change never happened, or a leave whose removal failed),
-- unless it changed since it was read: a join in between raised its score and keeps it.
-- KEYS: 1 P:{u:USER}:convs
-- ARGV: 1 conversation id, 2 the score the listing read
-- Returns {'1'} if dropped, else {'0'}.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {'1'}
end
return {'0'}
