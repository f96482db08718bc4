-- Appends a message unless its sender used the client message id within the idempotency window
-- (and the message it created is still kept).
-- A message carrying a file is listed in the file's index (so deleting the file finds every
-- copy), unless the file was deleted: then it is refused.
-- Client message ids are remembered in HASHes per window-long time bucket,
-- P:{c:C}:idem:<floor(now / window)>, field "<sender length>:<sender>:<client_message_id>" ->
-- "<seq>|<time ms>|<fingerprint>"; a bucket expires one window after its end, so a lookup reads
-- the current and the previous bucket and checks the time. One HASH entry per send costs far
-- less than a key with its own expiry.
-- KEYS: 9 by:<sender>, 10 file index P:{c:C}:file:<file_id> (only when the message carries a
--   file)
-- ARGV: 6 sender, 7 message id, 8 MessageRecord JSON, 9 fingerprint, 10 window (s),
--   11 idempotency field, 12 the file's expire time (ms; only with KEYS[10])
-- Returns {rejection} | {'duplicate', fingerprint, stored message} |
--   {'appended', event member}
-- Nothing here depends on the number of participants (ListConversations reads meta's 'active').
local K_BY, K_FILE = KEYS[9], KEYS[10]
local sender, message_id, record = ARGV[6], ARGV[7], ARGV[8]
local window_ms, idem_field = tonumber(ARGV[10]) * 1000, ARGV[11]
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
local now = now_ms()
local bucket = window_ms > 0 and math.floor(now / window_ms) or 0
local function idem_key(n)
  return BASE .. 'idem:' .. int(n)
end
if window_ms > 0 then
  -- The current bucket holds the newest entry; the previous one may still be in the window.
  local seen = redis.call('HGET', idem_key(bucket), idem_field)
    or redis.call('HGET', idem_key(bucket - 1), idem_field)
  if seen then
    local seq, time, fingerprint = string.match(seen, '^(%d+)|(%-?%d+)|(.*)$')
    if seq and now - tonumber(time) < window_ms then
      local prior_id = redis.call('ZRANGEBYSCORE', K_MSGS, seq, seq)[1]
      local prior = prior_id and redis.call('HGET', K_MSG, prior_id)
      if prior then
        return {'duplicate', fingerprint, prior}
      end
    end
  end
end
local seq = int(tonumber(meta[1]) + 1)
redis.call('HSET', K_META, 'last_seq', seq, 'active', int(now))
redis.call('HSET', K_MSG, message_id, seq .. ':' .. int(now) .. ':' .. record)
redis.call('ZADD', K_MSGS, seq, message_id)
-- Members are sequences: only counts by score are read, and a number costs less than an id.
redis.call('ZADD', K_BY, seq, seq)
redis.call('SADD', K_SENDERS, sender)
if K_FILE then
  redis.call('HSET', K_FILE, 'm:' .. message_id, seq)
  redis.call('PEXPIREAT', K_FILE, ARGV[12])
end
if window_ms > 0 then
  local key = idem_key(bucket)
  redis.call('HSET', key, idem_field, seq .. '|' .. int(now) .. '|' .. ARGV[9])
  redis.call('PEXPIREAT', key, int((bucket + 2) * window_ms))
end
-- The message's event is its entries in msgs and msg (events_after.lua merges them in); it is
-- published once everything is stored, so a write that fails never reaches a subscriber.
local member = publish_event(seq, now, '{"MessageCreated":' .. record .. '}')
meta[1] = seq
trim(now, meta)
return {'appended', member}
