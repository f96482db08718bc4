#!lua flags=no-writes
-- One consistent read of a conversation.
-- KEYS: 1 meta, 2 members
-- Returns {} when it does not exist, else
--   {'found', fingerprint, title, created_by, create_time, last_seq, participants...}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local out = {'found'}
local meta = redis.call('HMGET', KEYS[1], 'fingerprint', 'title', 'created_by', 'create_time', 'last_seq')
for i = 1, 5 do
  out[#out + 1] = meta[i] or ''
end
for _, user in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  out[#out + 1] = user
end
return out
