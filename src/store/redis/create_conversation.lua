-- Creates the conversation unless it exists. No event: last_seq starts at 0.
-- ARGV: 6 title, 7 created_by, 8 fingerprint, 9.. participants (creator first, no duplicates)
-- Returns snapshot({'existing'}) or snapshot({'created'}).
if redis.call('EXISTS', K_META) == 1 then
  return snapshot({'existing'})
end
local now = now_ms()
local joined = #ARGV - 8
redis.call('HSET', K_META, 'title', ARGV[6], 'created_by', ARGV[7], 'create_time', int(now),
  'last_seq', '0', 'trimmed_through', '0', 'fingerprint', ARGV[8], 'joins', int(joined))
for i = 9, #ARGV do
  redis.call('ZADD', K_MEMBERS, int(i - 8), ARGV[i])
end
return snapshot({'created'})
