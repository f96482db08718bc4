-- Appends a message unless its sender used the client message id within the idempotency window
-- (and the message it created is still kept).
-- A message carrying a file is listed in the file's index (so deleting the file finds every
-- copy), unless the file was deleted: then it is refused.
-- KEYS: 9 by:<sender>, 10 idempotency key, 11 file index P:{c:C}:file:<file_id> (only when the
--   message carries a file)
-- ARGV: 6 sender, 7 message id, 8 MessageRecord JSON, 9 fingerprint, 10 window (s),
--   11 the file's expire time (ms; only with KEYS[11])
-- Returns {rejection} | {'duplicate', fingerprint, stored message} |
--   {'appended', event member}
-- Nothing here depends on the number of participants (ListConversations reads meta's 'active').
local K_BY, K_IDEM, K_FILE = KEYS[9], KEYS[10], KEYS[11]
local sender, message_id, record = ARGV[6], ARGV[7], ARGV[8]
-- refusal_for, with the meta fields this script needs read in the same call.
local meta = redis.call('HMGET', K_META, 'last_seq', 'trimmed_through', 'oldest')
if not meta[1] then
  return {'conversation_not_found'}
end
if not is_member(sender) then
  return {'not_participant'}
end
if K_FILE and redis.call('HEXISTS', K_FILE, 'gone') == 1 then
  return {'file_deleted'}
end
local seen = redis.call('GET', K_IDEM)
if seen then
  local bar = string.find(seen, '|', 1, true)
  if bar then
    local prior = redis.call('HGET', K_MSG, string.sub(seen, 1, bar - 1))
    if prior then
      return {'duplicate', string.sub(seen, bar + 1), prior}
    end
  end
end
local now = now_ms()
local seq = int(tonumber(meta[1]) + 1)
-- The message's event is its entries in msgs and msg (events_after.lua merges them in).
local member = publish_event(seq, now, '{"MessageCreated":' .. record .. '}')
redis.call('HSET', K_META, 'last_seq', seq, 'active', int(now))
redis.call('HSET', K_MSG, message_id, seq .. ':' .. int(now) .. ':' .. record)
redis.call('ZADD', K_MSGS, seq, message_id)
redis.call('ZADD', K_BY, seq, message_id)
redis.call('SADD', K_SENDERS, sender)
if K_FILE then
  redis.call('HSET', K_FILE, 'm:' .. message_id, seq)
  redis.call('PEXPIREAT', K_FILE, ARGV[11])
end
if tonumber(ARGV[10]) > 0 then
  redis.call('SET', K_IDEM, message_id .. '|' .. ARGV[9], 'EX', ARGV[10])
else
  redis.call('DEL', K_IDEM)
end
meta[1] = seq
trim(now, meta)
return {'appended', member}
