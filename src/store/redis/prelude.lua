-- Prelude of every script that writes one conversation (spliced in front of it at compile time).
--
-- KEYS (all in the conversation's hash slot):
--   1 meta  2 members  3 events  4 msgs  5 msg  6 dead  7 senders  8 read
-- meta's 'active' is the time of the newest message (ListConversations reads it; nothing per
-- participant is written on a send); 'oldest' the time of the oldest kept event (see trim).
-- ARGV:
--   1 key base "P:{c:C}:" (per-sender keys are built from it; same slot)
--   2 conversation id   3 pub/sub channel   4 max events   5 max age (ms)
-- Script-specific KEYS start at 9, ARGV at 6.
--
-- JSON is only ever built by concatenating JSON that Rust prepared, or cjson.encode of strings and
-- string arrays (see json_array for the empty-array case). Numbers go through int() because Lua
-- numbers are doubles and tostring() would switch to exponent notation.
local K_META, K_MEMBERS, K_EVENTS = KEYS[1], KEYS[2], KEYS[3]
local K_MSGS, K_MSG, K_DEAD, K_SENDERS, K_READ = KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local BASE, CONVERSATION_ID, CHANNEL = ARGV[1], ARGV[2], ARGV[3]
local MAX_EVENTS, MAX_AGE_MS = tonumber(ARGV[4]), tonumber(ARGV[5])

local function int(n)
  return string.format('%.0f', n)
end

-- The server's clock, so every replica of the service stamps events from one clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Redis' cjson encodes an empty table as {}; serde wants [].
local function json_array(list)
  if #list == 0 then
    return '[]'
  end
  return cjson.encode(list)
end

local function is_member(user)
  return redis.call('ZSCORE', K_MEMBERS, user) ~= false
end

-- Why `user` may not act on this conversation ({rejection}), or nil when they may.
local function refusal_for(user)
  if redis.call('EXISTS', K_META) == 0 then
    return {'conversation_not_found'}
  end
  if not is_member(user) then
    return {'not_participant'}
  end
  return nil
end

-- Applies `fn(chunk)` to `list` in chunks, keeping unpack() well inside Lua's stack limit.
local function in_chunks(list, fn)
  for i = 1, #list, 500 do
    fn({unpack(list, i, math.min(i + 499, #list))})
  end
end

-- {prefix..., fingerprint, title, created_by, create_time, last_seq, participants...}
local function snapshot(prefix)
  local out = prefix
  local meta = redis.call('HMGET', K_META, 'fingerprint', 'title', 'created_by', 'create_time', 'last_seq')
  for i = 1, 5 do
    out[#out + 1] = meta[i] or ''
  end
  for _, user in ipairs(redis.call('ZRANGE', K_MEMBERS, 0, -1)) do
    out[#out + 1] = user
  end
  return out
end

-- Records event `seq` and publishes it (inside the script, so publish order is commit order).
-- `stored`, when given, replaces the JSON in the events ZSET (a MessageCreated event stores only
-- '@<message id>': its record lives once, in the msg HASH, and events_after.lua reads it there).
-- Returns the event's member "<seq>:<create_time_ms>:<json EventKind>" (as published).
local function record_event(seq, now, kind_json, stored)
  local head = int(seq) .. ':' .. int(now) .. ':'
  local member = head .. kind_json
  redis.call('ZADD', K_EVENTS, int(seq), stored and (head .. stored) or member)
  redis.call('PUBLISH', CHANNEL, CONVERSATION_ID .. ':' .. member)
  return member
end

-- Takes the next sequence and records the event (see record_event).
local function append_event(now, kind_json, stored)
  return record_event(redis.call('HINCRBY', K_META, 'last_seq', 1), now, kind_json, stored)
end

-- Drops events older than the max age and beyond the max count, with the messages they created,
-- so history and unread counts never refer to trimmed events. Events are kept gap-free from
-- trimmed_through + 1 to last_seq, so the count is a subtraction. By age: meta's 'oldest' is the
-- time of the oldest kept event (absent until known), so a young conversation costs no read;
-- otherwise the oldest events are read (their members carry their time) until one is young
-- enough, each event being passed over once when it expires. Times come from one clock
-- (Redis'), so they grow with the sequence; should the clock step back, this stops early and
-- trims later.
-- `meta` is {last_seq, trimmed_through, oldest} as stored after the write, or nil to read it.
local function trim(now, meta)
  meta = meta or redis.call('HMGET', K_META, 'last_seq', 'trimmed_through', 'oldest')
  local last, trimmed = tonumber(meta[1] or '0'), tonumber(meta[2] or '0')
  local cutoff = now - MAX_AGE_MS
  local oldest = tonumber(meta[3] or '')
  if last - trimmed <= MAX_EVENTS and oldest and oldest >= cutoff then
    return
  end
  local through = trimmed
  if last - trimmed > MAX_EVENTS then
    through = last - MAX_EVENTS
  end
  local batch = 1
  local head_time = nil
  while through < last do
    local kept = redis.call('ZRANGEBYSCORE', K_EVENTS, '(' .. int(through), '+inf', 'LIMIT', 0, batch)
    for _, member in ipairs(kept) do
      local seq, time = string.match(member, '^(%d+):(%-?%d+):')
      if tonumber(time) >= cutoff then
        head_time = time
        break
      end
      through = tonumber(seq)
    end
    if head_time or #kept == 0 then
      break
    end
    batch = 64
  end
  if through > trimmed then
    local upto = int(through)
    redis.call('ZREMRANGEBYSCORE', K_EVENTS, '-inf', upto)
    local ids = redis.call('ZRANGEBYSCORE', K_MSGS, '-inf', upto)
    in_chunks(ids, function(chunk) redis.call('HDEL', K_MSG, unpack(chunk)) end)
    redis.call('ZREMRANGEBYSCORE', K_MSGS, '-inf', upto)
    redis.call('ZREMRANGEBYSCORE', K_DEAD, '-inf', upto)
    for _, sender in ipairs(redis.call('SMEMBERS', K_SENDERS)) do
      local key = BASE .. 'by:' .. sender
      redis.call('ZREMRANGEBYSCORE', key, '-inf', upto)
      if redis.call('ZCARD', key) == 0 then
        redis.call('SREM', K_SENDERS, sender)
      end
    end
    redis.call('HSET', K_META, 'trimmed_through', upto)
  end
  if head_time then
    redis.call('HSET', K_META, 'oldest', head_time)
  else
    redis.call('HDEL', K_META, 'oldest')
  end
end
