-- Turns a message into a tombstone (history and the replayed MessageCreated event) and records
-- MessageDeleted. Rust read the stored message first and built the tombstone from it; ARGV[8] is
-- what it read, so a concurrent change makes this answer 'retry' instead of writing a stale
-- tombstone.
-- KEYS: 9 by:<acting user>
-- ARGV: 6 acting user, 7 message id, 8 stored message as read ('' if none),
--   9 tombstone MessageRecord JSON, 10 MessageDeleted EventKind JSON
-- Returns {rejection} | {'retry'} | {'already_deleted', stored message} |
--   {'deleted', tombstone message, event member}
local K_BY = KEYS[9]
local by, message_id = ARGV[6], ARGV[7]
local refused = refusal_for(by)
if refused then
  return refused
end
local stored = redis.call('HGET', K_MSG, message_id)
if not stored then
  return {'message_not_found'}
end
local seq, time, json = string.match(stored, '^(%d+):(%-?%d+):(.*)$')
if not seq then
  return redis.error_reply('corrupt message entry')
end
local record = cjson.decode(json)
if record.sender ~= by then
  return {'not_sender'}
end
if record.content == nil or record.content == cjson.null then
  return {'already_deleted', stored}
end
if stored ~= ARGV[8] then
  return {'retry'}
end
local prefix = seq .. ':' .. time .. ':'
local tombstone = prefix .. ARGV[9]
-- The MessageCreated event is read from this entry (events_after.lua): it replays the tombstone.
redis.call('HSET', K_MSG, message_id, tombstone)
redis.call('ZADD', K_DEAD, seq, seq)
redis.call('ZREM', K_BY, seq)
local now = now_ms()
local member = append_event(now, ARGV[10])
trim(now)
return {'deleted', tombstone, member}
