-- Prelude of every upload-session script (spliced in front of it at compile time).
--
-- KEYS (all in the owner's hash slot {u:USER}):
--   1 the session, HASH P:{u:USER}:upload:<digest>
--   2 the owner's unfinished sessions, ZSET P:{u:USER}:uploads (member = digest, score = expire_time)
-- The session HASH holds:
--   state      the UploadSession as JSON (Rust's; never decoded here)
--   holder     the lease holder, '' when nobody holds it
--   until      the lease's end (Unix ms, the holder's clock)
--   committed  committed_size, which never decreases
--   complete   '1' once complete, else '0'
--   expire     expire_time (Unix ms)
-- Times come from the caller (ARGV), like every clock value of the upload flow.
local K_SESSION, K_OPEN = KEYS[1], KEYS[2]

local function int(n)
  return string.format('%.0f', n)
end

-- Whether a writer other than `holder` holds the session's lease at `now`.
local function held_by_another(holder, now)
  local lease = redis.call('HMGET', K_SESSION, 'holder', 'until')
  return lease[1] ~= false and lease[1] ~= '' and lease[1] ~= holder and tonumber(lease[2]) > now
end

-- Whether `holder` holds the lease, however late: only a takeover ends it for its holder.
local function held_by(holder)
  local current = redis.call('HGET', K_SESSION, 'holder')
  return holder ~= '' and current == holder
end

-- Writes the whole session. The key outlives expire_time by `grace` ms, so the janitor can still
-- read it, and then disappears even if nobody removes it; the owner's index lives as long as its
-- latest session.
local function store(state, holder, lease_until, committed, complete, expire, grace, member)
  redis.call('HSET', K_SESSION, 'state', state, 'holder', holder, 'until', lease_until,
    'committed', committed, 'complete', complete, 'expire', expire)
  local gone_at = tonumber(expire) + tonumber(grace)
  redis.call('PEXPIREAT', K_SESSION, int(gone_at))
  if complete == '1' then
    redis.call('ZREM', K_OPEN, member)
    return
  end
  redis.call('ZADD', K_OPEN, expire, member)
  -- Until the latest session's key is gone (PEXPIRETIME and PEXPIREAT GT would need Redis 7).
  local latest = redis.call('ZRANGE', K_OPEN, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', K_OPEN, int(tonumber(latest[2]) + tonumber(grace)))
end
