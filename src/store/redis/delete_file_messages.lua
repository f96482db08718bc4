-- Tombstones every message carrying a file (history and the replayed MessageCreated events),
-- records a MessageDeleted event for each, and marks the file deleted so no later message can
-- carry it. Rust read the index and the messages first (file_messages.lua) and built each
-- tombstone; if anything changed since (a new re-post, a deletion), this answers 'retry'.
-- KEYS: 9 P:{c:C}:file:<file_id> (HASH: 'm:<message id>' per carrier, 'gone' once deleted)
-- ARGV: 6 acting user, 7 file expire time (ms),
--   8.. groups of 4: message id, stored message as read, tombstone MessageRecord JSON and
--   MessageDeleted EventKind JSON ('' and '' for a message that was already a tombstone)
-- Returns {rejection} | {'retry'} | {'deleted', event members...}
local K_FILE = KEYS[9]
local by = ARGV[6]
local refused = refusal_for(by)
if refused then
  return refused
end
local read = {}
for i = 8, #ARGV, 4 do
  read[ARGV[i]] = ARGV[i + 1]
  if redis.call('HGET', K_MSG, ARGV[i]) ~= ARGV[i + 1] then
    return {'retry'}
  end
end
for _, field in ipairs(redis.call('HKEYS', K_FILE)) do
  local message_id = string.match(field, '^m:(.+)$')
  if message_id and not read[message_id] and redis.call('HEXISTS', K_MSG, message_id) == 1 then
    return {'retry'}
  end
end
local now = now_ms()
local out = {'deleted'}
for i = 8, #ARGV, 4 do
  local message_id, stored, tombstone, deleted = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if tombstone ~= '' then
    local seq, time, json = string.match(stored, '^(%d+):(%-?%d+):(.*)$')
    if not seq then
      return redis.error_reply('corrupt message entry')
    end
    local sender = cjson.decode(json).sender
    local prefix = seq .. ':' .. time .. ':'
    -- The MessageCreated event is read from this entry (events_after.lua): it replays the tombstone.
    redis.call('HSET', K_MSG, message_id, prefix .. tombstone)
    redis.call('ZADD', K_DEAD, seq, seq)
    redis.call('ZREM', BASE .. 'by:' .. sender, seq)
    out[#out + 1] = append_event(now, deleted)
  end
end
redis.call('DEL', K_FILE)
redis.call('HSET', K_FILE, 'gone', '1')
redis.call('PEXPIREAT', K_FILE, ARGV[7])
trim(now)
return out
