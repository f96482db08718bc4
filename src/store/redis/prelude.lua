-- Prelude of every script that writes one conversation (spliced in front of it at compile time).
--
-- KEYS (all in the conversation's hash slot):
--   1 meta  2 members  3 events (all but MessageCreated)  4 msgs  5 msg  6 dead  7 senders  8 read
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

-- An event's member "<seq>:<create_time_ms>:<json EventKind>".
local function event_member(seq, now, kind_json)
  return int(seq) .. ':' .. int(now) .. ':' .. kind_json
end

-- Publishes an event's member (inside the script, so publish order is commit order).
local function publish_member(member)
  redis.call('PUBLISH', CHANNEL, CONVERSATION_ID .. ':' .. member)
  return member
end

-- Publishes event `seq`; returns its member.
local function publish_event(seq, now, kind_json)
  return publish_member(event_member(seq, now, kind_json))
end

-- Takes the next sequence, records the event in the events ZSET and publishes it. (A
-- MessageCreated is not recorded there: the message's entries in msgs and msg are its event.)
local function append_event(now, kind_json)
  local seq = redis.call('HINCRBY', K_META, 'last_seq', 1)
  local member = event_member(seq, now, kind_json)
  redis.call('ZADD', K_EVENTS, int(seq), member)
  -- Published once stored: a write that fails never reaches a subscriber.
  return publish_member(member)
end

-- The kept events after sequence `after`, oldest first, as {seq, time} pairs: up to `count`
-- from the events ZSET and from msgs each, merged, cut where either list may continue.
local function oldest_events(after, count)
  local bound = '(' .. int(after)
  local others = redis.call('ZRANGEBYSCORE', K_EVENTS, bound, '+inf', 'LIMIT', 0, count)
  local messages = redis.call('ZRANGEBYSCORE', K_MSGS, bound, '+inf', 'WITHSCORES', 'LIMIT', 0, count)
  local out, cut = {}, math.huge
  for _, member in ipairs(others) do
    local seq, time = string.match(member, '^(%d+):(%-?%d+):')
    out[#out + 1] = {tonumber(seq), tonumber(time)}
  end
  if #others == count and #others > 0 then
    cut = out[#out][1]
  end
  if #messages > 0 then
    local ids = {}
    for i = 1, #messages, 2 do
      ids[#ids + 1] = messages[i]
    end
    local stored = redis.call('HMGET', K_MSG, unpack(ids))
    for i = 1, #ids do
      local time = string.match(stored[i] or '', '^%d+:(%-?%d+):')
      out[#out + 1] = {tonumber(messages[2 * i]), tonumber(time or '0')}
    end
    if #ids == count then
      cut = math.min(cut, tonumber(messages[#messages]))
    end
  end
  table.sort(out, function(a, b) return a[1] < b[1] end)
  local kept = {}
  for _, event in ipairs(out) do
    if event[1] > cut then
      break
    end
    kept[#kept + 1] = event
  end
  return kept
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
    local kept = oldest_events(through, batch)
    for _, event in ipairs(kept) do
      if event[2] >= cutoff then
        head_time = int(event[2])
        break
      end
      through = event[1]
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
