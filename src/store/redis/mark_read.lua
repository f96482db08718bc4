-- Moves a participant's read position forward and records a read receipt.
-- ARGV: 6 user, 7 sequence, 8 ReadReceipt EventKind JSON
-- Returns {rejection} | {'unchanged', current read sequence} | {'advanced', event member}
local user = ARGV[6]
local refused = refusal_for(user)
if refused then
  return refused
end
local wanted = tonumber(ARGV[7])
if wanted > tonumber(redis.call('HGET', K_META, 'last_seq')) then
  return {'sequence_ahead'}
end
local current = redis.call('HGET', K_READ, user) or '0'
if wanted <= tonumber(current) then
  return {'unchanged', current}
end
redis.call('HSET', K_READ, user, ARGV[7])
local now = now_ms()
local member = append_event(now, ARGV[8])
trim(now)
return {'advanced', member}
