#!lua flags=no-writes
-- The messages a file's index lists that are still kept, as stored (tombstones included).
-- KEYS: 1 P:{c:C}:file:<file_id>, 2 msg
-- Returns {message id, stored message, ...}
local out = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local message_id = string.match(field, '^m:(.+)$')
  if message_id then
    local stored = redis.call('HGET', KEYS[2], message_id)
    if stored then
      out[#out + 1] = message_id
      out[#out + 1] = stored
    end
  end
end
return out
