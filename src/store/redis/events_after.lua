#!lua flags=no-writes
-- KEYS: 1 meta, 2 events, 3 msg, 4 msgs
-- ARGV: 1 after (exclusive), 2 limit
-- Returns {trimmed_through, event members...} (oldest first), each "<seq>:<time>:<json EventKind>".
-- MessageCreated events are not in the events ZSET: they are the messages of msgs (by sequence)
-- with their records in msg (a deletion left the tombstone there), merged in here by sequence.
local out = {redis.call('HGET', KEYS[1], 'trimmed_through') or '0'}
local limit = tonumber(ARGV[2])
if limit > 0 then
  local after = '(' .. ARGV[1]
  local others = redis.call('ZRANGEBYSCORE', KEYS[2], after, '+inf', 'LIMIT', 0, ARGV[2])
  local messages = redis.call('ZRANGEBYSCORE', KEYS[4], after, '+inf', 'WITHSCORES', 'LIMIT', 0, ARGV[2])
  local stored = {}
  -- In chunks: unpack() of thousands of ids would overflow Lua's stack.
  for i = 1, #messages, 1000 do
    local ids = {}
    for j = i, math.min(i + 999, #messages), 2 do
      ids[#ids + 1] = messages[j]
    end
    for _, entry in ipairs(redis.call('HMGET', KEYS[3], unpack(ids))) do
      stored[#stored + 1] = entry
    end
  end
  local i, j = 1, 1
  while #out - 1 < limit and (i <= #others or j <= #stored) do
    local other_seq = i <= #others and tonumber(string.match(others[i], '^(%d+):')) or math.huge
    local message_seq = j <= #stored and tonumber(messages[2 * j]) or math.huge
    if other_seq < message_seq then
      out[#out + 1] = others[i]
      i = i + 1
    else
      local entry = stored[j]
      if not entry then
        return redis.error_reply('a listed message has no record')
      end
      local head, record = string.match(entry, '^(%d+:%-?%d+:)(.*)$')
      out[#out + 1] = head .. '{"MessageCreated":' .. record .. '}'
      j = j + 1
    end
  end
end
return out
