#!lua flags=no-writes
-- KEYS: 1 meta, 2 events, 3 msg
-- ARGV: 1 after (exclusive), 2 limit
-- Returns {trimmed_through, event members...} (oldest first), each "<seq>:<time>:<json EventKind>".
-- A MessageCreated event is stored as "<seq>:<time>:@<message id>"; its record is read from the
-- msg HASH (trimming drops both together; a deletion left the tombstone there).
local out = {redis.call('HGET', KEYS[1], 'trimmed_through') or '0'}
if tonumber(ARGV[2]) > 0 then
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])) do
    local head, message_id = string.match(member, '^(%d+:%-?%d+:)@(.*)$')
    if head then
      local stored = redis.call('HGET', KEYS[3], message_id)
      if not stored then
        return redis.error_reply('event refers to a missing message')
      end
      local record = string.match(stored, '^%d+:%-?%d+:(.*)$')
      member = head .. '{"MessageCreated":' .. record .. '}'
    end
    out[#out + 1] = member
  end
end
return out
